//! The training path's layers with a backward of our own, on the CPU in f32: convolution,
//! linear, group norm (optionally fused with SiLU), layer norm, attention, GELU and GEGLU, each a
//! candle custom op whose `bwd` runs one more custom op that computes every gradient of the layer
//! in one pass.
//!
//! Why: built from candle ops, a training step of the demo UNet spent 22% of its time in candle's
//! reductions over leading dimensions (the backward of every bias, and of every norm's scale and
//! shift, broadcast over batch and positions: an index division per element), 9% in its
//! transposed convolution (the convolution's input gradient, a dot product per output element),
//! and most of the rest in element-wise passes of the eight-op group norm (`perf` on
//! `sdfix finetune --model demo-flawed --data demo`). Here every gradient is matrix products
//! (the gemm crate) or one fused pass.
//!
//! One file per op, as the inference kernels are:
//!
//! - [`linear`](linear()): `x @ W^T + b`; the backward is two matrix products and a column sum.
//! - [`conv2d`]: the input gradient a convolution too, the weight gradient one product per tap
//!   (see `conv.rs`).
//! - [`group_norm`] (optionally fused with SiLU) and [`layer_norm`] recompute their statistics in
//!   the backward (f64 sums) rather than keeping them, and give
//!   `dx = rstd (g - mean(g) - xhat mean(g xhat))`, `g = dy * gamma`.
//! - [`attention`](attention()): one task per (sample, head) on the heads' columns in place, the
//!   probabilities recomputed in the backward.
//! - [`gelu_erf`] and [`geglu`].
//!
//! Here: the wrapper that makes a weighted op (linear, convolution) a candle op with or without a
//! bias, and the unpacking of a backward's packed gradients; `matmul.rs` holds the strided matrix
//! products every backward uses.

mod activation;
mod attention;
mod conv;
mod group_norm;
mod layer_norm;
mod linear;
mod matmul;

pub use activation::{geglu, gelu_erf};
pub use attention::attention;
pub use conv::conv2d;
pub use group_norm::group_norm;
pub use layer_norm::layer_norm;
pub use linear::linear;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// The packed output of a backward op, split back into gradients of the given shapes.
fn unpack<const N: usize>(packed: &Tensor, shapes: [&[usize]; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let mut out = Vec::with_capacity(N);
    for shape in shapes {
        let len: usize = shape.iter().product();
        out.push(packed.narrow(0, start, len)?.reshape(shape)?);
        start += len;
    }
    Ok(out.try_into().expect("one tensor per shape"))
}

/// Sums `values` (rows of `width`) over the rows, in f64.
fn column_sums(values: &[f32], width: usize) -> Vec<f64> {
    let mut sums = vec![0f64; width];
    for row in values.chunks(width) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    sums
}

/// A training op over an input, a weight and an optional bias (linear, convolution): the
/// forward on contiguous f32 storage, and every gradient from the output's.
trait WeightedGrad: Send + Sync + 'static {
    /// The op's name in candle and in errors.
    const NAME: &'static str;

    fn forward(
        &self,
        input: (&CpuStorage, &Layout),
        weight: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)>;

    /// (d input, or None when nothing upstream wants it; d weight; d bias, dropped when the
    /// call had no bias).
    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Tensor, Tensor)>;
}

/// A [`WeightedGrad`] as a candle op with a backward: two operands without a bias, three with
/// one (as [`crate::kernels::cpu_op`]'s wrapper does for the inference kernels).
struct WithGrad<K>(K);

impl<K: WeightedGrad> CustomOp2 for WithGrad<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.backward(x, w, grad)?;
        Ok((dx, Some(dw)))
    }
}

impl<K: WeightedGrad> CustomOp3 for WithGrad<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.0.backward(x, w, grad)?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// Checks of our gradients against candle's autograd, shared by each op's tests.
#[cfg(test)]
mod testing {
    use candle_core::{DType, Device, Result, Tensor, Var};

    /// Gradients of sum(f(inputs) * probe) for our op and for candle's ops on f64 copies.
    pub(super) fn compare(
        inputs: &[Tensor],
        ours: impl Fn(&[Tensor]) -> Result<Tensor>,
        reference: impl Fn(&[Tensor]) -> Result<Tensor>,
        tolerance: f64,
        label: &str,
    ) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = ours(&tensors).unwrap();
        let probe = Tensor::randn(0f32, 1., out.shape(), &Device::Cpu).unwrap();
        let grads = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();

        let vars64: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
            .collect();
        let tensors64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
        let out64 = reference(&tensors64).unwrap();
        let rel = |a: &Tensor, b: &Tensor| -> f64 {
            let a = a.to_dtype(DType::F64).unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .max(1e-12);
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                / scale
        };
        let out_diff = rel(&out, &out64);
        assert!(out_diff < tolerance, "{label}: forward differs by {out_diff:e}");
        let grads64 = (&out64 * probe.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, (v, v64)) in vars.iter().zip(&vars64).enumerate() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for input {i}"));
            let g64 = grads64.get(v64.as_tensor()).expect("reference gradient");
            let diff = rel(g, g64);
            assert!(diff < tolerance, "{label}: gradient {i} differs by {diff:e}");
        }
    }

    pub(super) fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }
}
