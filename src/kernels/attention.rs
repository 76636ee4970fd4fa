//! Scaled dot-product attention on the CPU in f32, as a candle custom op that never builds the
//! whole score matrix (see [`attention`]).

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu_math;
use crate::kernels::cpu_op::{contiguous_f32, SharedOut};

/// Multi-head attention of `query` (b, n, h*d) over `key`/`value` (b, m, h*d), all f32 on the CPU,
/// `heads` heads, scores scaled by 1/sqrt(d), plus `mask` ((n, m) or broadcastable to it, f32)
/// when given; (b, n, h*d).
///
/// Flash-attention style: for each (sample, head, block of QUERY_BLOCK queries), in parallel, the
/// keys in blocks of KEY_BLOCK: the block's scores (one single-threaded matrix product reading q
/// and k in place from their (b, tokens, h*d) layout), the mask added, an online softmax (running
/// row maximum and sum, earlier output rescaled), and the product with v accumulated; the output
/// is divided by the sums and written into its (b, n, h*d) layout. The scores of a block
/// (<= 512 KB) stay in L2; the whole 4096 x 4096 matrix per head at 512 px would be 64 MB
/// (`scripts/attention_compare.sh` times it against PyTorch's SDPA).
pub fn attention(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let keys = key.dim(1)?;
    if key.dims3()? != (batch, keys, inner) || value.dims3()? != (batch, keys, inner) || inner % heads != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            query.dims(),
            key.dims(),
            value.dims()
        )
    }
    let mask = match mask {
        Some(m) => {
            let m = m.broadcast_as((queries, keys))?.contiguous()?;
            Some(m.flatten_all()?.to_vec1::<f32>()?)
        }
        None => None,
    };
    let (q, k, v) = (query.contiguous()?, key.contiguous()?, value.contiguous()?);
    let op = CpuAttention {
        heads,
        mask,
        scale: 1.0 / ((inner / heads) as f32).sqrt(),
    };
    q.apply_op3_no_bwd(&k, &v, &op)
}

/// Queries per task and keys per block: (256 x 512) f32 scores = 512 KB, as PyTorch's CPU flash
/// attention splits them.
const QUERY_BLOCK: usize = 256;
const KEY_BLOCK: usize = 512;

struct CpuAttention {
    heads: usize,
    /// (queries, keys), added to the scores.
    mask: Option<Vec<f32>>,
    scale: f32,
}

impl candle_core::CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "sdfix-attention"
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
        let (q, k, v) = (
            contiguous_f32(s1, l1, "attention")?,
            contiguous_f32(s2, l2, "attention")?,
            contiguous_f32(s3, l3, "attention")?,
        );
        let (batch, queries, inner) = l1.shape().dims3()?;
        let keys = l2.shape().dims()[1];
        let head_dim = inner / self.heads;
        let query_blocks = queries.div_ceil(QUERY_BLOCK);
        // Not zeroed: every (sample, query, head) row is stored below.
        let mut out: Vec<f32> = Vec::with_capacity(batch * queries * inner);
        let shared = SharedOut::new_uninit(&mut out);
        let ld = inner as isize;
        (0..batch * self.heads * query_blocks).into_par_iter().for_each(|task| {
            let (b, rest) = (task / (self.heads * query_blocks), task % (self.heads * query_blocks));
            let (h, blk) = (rest / query_blocks, rest % query_blocks);
            let r0 = blk * QUERY_BLOCK;
            let rows = QUERY_BLOCK.min(queries - r0);
            let key_block = KEY_BLOCK.min(keys);
            let mut scores = vec![0f32; rows * key_block];
            let mut acc = vec![0f32; rows * head_dim];
            let mut running_max = vec![f32::NEG_INFINITY; rows];
            let mut running_sum = vec![0f32; rows];
            let mut correction = vec![0f32; rows];
            let q_at = (b * queries + r0) * inner + h * head_dim;
            for k0 in (0..keys).step_by(key_block) {
                let cols = key_block.min(keys - k0);
                let kv_at = (b * keys + k0) * inner + h * head_dim;
                // SAFETY: q rows r0.. of sample b, head h: (rows x d), row stride inner; k^T for
                // keys k0..k0+cols: (d x cols), element (j, t) at kv_at + t * inner + j; scores
                // (rows x cols), row stride cols, inside the rows * key_block buffer.
                unsafe {
                    gemm::gemm(
                        rows,
                        cols,
                        head_dim,
                        scores.as_mut_ptr(),
                        1,
                        cols as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        ld,
                        k.as_ptr().add(kv_at),
                        ld,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let scores = &mut scores[..rows * cols];
                if let Some(mask) = &self.mask {
                    for (i, row) in scores.chunks_mut(cols).enumerate() {
                        let mask_row = &mask[(r0 + i) * keys + k0..][..cols];
                        for (s, m) in row.iter_mut().zip(mask_row) {
                            *s += m;
                        }
                    }
                }
                cpu_math::online_softmax_rows(scores, cols, &mut running_max, &mut running_sum, &mut correction);
                if k0 > 0 {
                    for (row, &c) in acc.chunks_mut(head_dim).zip(&correction) {
                        row.iter_mut().for_each(|x| *x *= c);
                    }
                }
                // SAFETY: terms (rows x cols), row stride cols; v for keys k0..: (cols x d), row
                // stride inner; acc (rows x d) contiguous, accumulated into (alpha 1).
                unsafe {
                    gemm::gemm(
                        rows,
                        head_dim,
                        cols,
                        acc.as_mut_ptr(),
                        1,
                        head_dim as isize,
                        k0 > 0,
                        scores.as_ptr(),
                        1,
                        cols as isize,
                        v.as_ptr().add(kv_at),
                        1,
                        ld,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
            for (i, (row, &sum)) in acc.chunks(head_dim).zip(&running_sum).enumerate() {
                let inv = 1.0 / sum;
                // SAFETY: row r0 + i of sample b, head h's d columns: this task's alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.ptr().add(q_at + i * inner), head_dim) };
                for (d, &x) in dst.iter_mut().zip(row) {
                    *d = x * inv;
                }
            }
        });
        // SAFETY: the tasks cover every (sample, head, query block), each storing all its rows.
        unsafe { out.set_len(batch * queries * inner) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The same attention as candle ops, for every device and dtype (GPUs, f16/bf16, f64): whole
/// (b, h, n, m) score tensors. [`crate::model::attention::scaled_dot_product_attention`]'s
/// fallback, and the reference of the CUDA kernels' checks ([`super::cuda::parity`]).
pub fn composite(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (batch, queries, inner) = query.dims3()?;
    let keys = key.dim(1)?;
    let head_dim = inner / heads;
    let dtype = query.dtype();
    let split = |x: &Tensor, tokens: usize| -> Result<Tensor> {
        // (b, tokens, h*d) -> (b, h, tokens, d)
        x.reshape((batch, tokens, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    // f32 scores at least (f64 stays f64: the tests' reference).
    let score_dtype = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let q = split(query, queries)?.to_dtype(score_dtype)?;
    let k = split(key, keys)?.to_dtype(score_dtype)?;
    let v = split(value, keys)?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    // (b, h, n, m)
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(score_dtype)?)?;
    }
    // candle-nn's fused softmax has no backward; its composite one (max, exp, sum, div) has.
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = probs.to_dtype(dtype)?;
    // (b, h, n, d) -> (b, n, h*d)
    probs.matmul(&v)?.transpose(1, 2)?.reshape((batch, queries, inner))
}
