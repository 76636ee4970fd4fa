//! Matrix products through strided views, for the backward passes: every gradient of a weight
//! or an input here is a product of the gemm crate read in place (no transposed copies).

use candle_core::Result;

/// A read-only matrix inside a slice: element (i, j) at `offset + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) data: &'a [f32],
    pub(super) offset: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl<'a> View<'a> {
    pub(super) fn new(
        data: &'a [f32],
        offset: usize,
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Self {
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst (m, n), row-major with row stride n` = (`accumulate` ? dst : 0) + `lhs (m, k) @ rhs (k, n)`.
pub(super) fn matmul_into(
    dst: &mut [f32],
    accumulate: bool,
    lhs: View,
    rhs: View,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    matmul_general(dst, accumulate, 1.0, lhs, rhs, parallelism)
}

/// `dst = scale * lhs @ rhs`.
pub(super) fn matmul_scaled_into(
    dst: &mut [f32],
    scale: f32,
    lhs: View,
    rhs: View,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    matmul_general(dst, false, scale, lhs, rhs, parallelism)
}

fn matmul_general(
    dst: &mut [f32],
    accumulate: bool,
    scale: f32,
    lhs: View,
    rhs: View,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k || dst.len() != m * n || !lhs.in_bounds() || !rhs.in_bounds() {
        candle_core::bail!(
            "matmul: ({m}, {k}) @ ({}, {n}) into {} elements, or a view out of bounds",
            rhs.rows,
            dst.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    // SAFETY: dst holds m * n elements (row stride n, column stride 1); lhs and rhs were checked
    // above to address only elements inside their slices; dst does not alias them (it is a
    // distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

pub(super) fn all_threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}
