//! Multi-head attention for training: one task per (sample, head) on the heads' columns in
//! place, the probabilities recomputed in the backward (the composite path kept (b, h, n, m)
//! tensors per op).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::matmul::{all_threads, matmul_into, matmul_scaled_into, View};
use super::unpack;
use crate::kernels::cpu_math;
use crate::kernels::cpu_op::contiguous_f32;

/// backward for the other three. Each (sample, head) pair is one task reading its
/// head's columns in place (no split into (b, h, n, d) copies); the probabilities are recomputed
/// in the backward rather than kept.
pub fn attention(query: &Tensor, key: &Tensor, value: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let mask = match mask {
        Some(mask) => {
            let (n, m) = (query.dim(1)?, key.dim(1)?);
            if mask.dims() != [n, m] {
                candle_core::bail!("attention: a mask {:?} for {n} queries and {m} keys", mask.dims())
            }
            Some(Arc::new(
                mask.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ))
        }
        None => None,
    };
    query
        .contiguous()?
        .apply_op3(&key.contiguous()?, &value.contiguous()?, TrainAttention { heads, mask })
}

#[derive(Clone)]
struct TrainAttention {
    heads: usize,
    /// The additive (n, m) mask, row-major.
    mask: Option<Arc<Vec<f32>>>,
}

/// The sizes of one attention call: batch, queries, keys, heads, head width.
#[derive(Clone, Copy)]
struct AttentionDims {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    head_dim: usize,
}

impl AttentionDims {
    fn new(heads: usize, q: &Layout, k: &Layout, v: &Layout) -> Result<Self> {
        let (batch, queries, inner) = q.shape().dims3()?;
        let (kb, keys, k_inner) = k.shape().dims3()?;
        if heads == 0 || !inner.is_multiple_of(heads) || (kb, k_inner) != (batch, inner) || v.shape() != k.shape() {
            candle_core::bail!(
                "attention: query {:?}, key {:?}, value {:?}, {heads} heads",
                q.shape(),
                k.shape(),
                v.shape()
            )
        }
        Ok(Self {
            batch,
            queries,
            keys,
            heads,
            head_dim: inner / heads,
        })
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Head `head` of sample `b` of a (b, rows, h*d) tensor: a (rows, d) view.
    fn head<'a>(&self, data: &'a [f32], rows: usize, task: usize) -> View<'a> {
        let (b, head) = (task / self.heads, task % self.heads);
        View::new(
            data,
            b * rows * self.inner() + head * self.head_dim,
            (rows, self.head_dim),
            (self.inner(), 1),
        )
    }

    /// The same head read transposed: a (d, rows) view.
    fn head_t<'a>(&self, data: &'a [f32], rows: usize, task: usize) -> View<'a> {
        let view = self.head(data, rows, task);
        View::new(data, view.offset, (self.head_dim, rows), (1, self.inner()))
    }

    /// One product per task when there are enough tasks for the threads, else threaded products.
    fn parallelism(&self) -> (bool, gemm::Parallelism) {
        if self.batch * self.heads >= rayon::current_num_threads() {
            (true, gemm::Parallelism::None)
        } else {
            (false, all_threads())
        }
    }

    /// Softmax(q k^T / sqrt(d) + mask) of task `task` into `probs` (n, m).
    fn probabilities(
        &self,
        q: &[f32],
        k: &[f32],
        mask: Option<&[f32]>,
        task: usize,
        probs: &mut [f32],
        parallelism: gemm::Parallelism,
    ) -> Result<()> {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        matmul_scaled_into(
            probs,
            scale,
            self.head(q, self.queries, task),
            self.head_t(k, self.keys, task),
            parallelism,
        )?;
        if let Some(mask) = mask {
            probs.iter_mut().zip(mask).for_each(|(p, m)| *p += m);
        }
        // The vectorised softmax of the inference kernel, as one block per row.
        let rows = self.queries;
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut correction = vec![0f32; rows];
        cpu_math::online_softmax_rows(probs, self.keys, &mut max, &mut sum, &mut correction);
        for (row, &total) in probs.chunks_mut(self.keys).zip(&sum) {
            let inv = 1.0 / total;
            row.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }

    /// Runs `f(task, chunk)` over the tasks, each with its own `chunk_len` slice of `out`.
    fn for_each_task(
        &self,
        out: &mut [f32],
        chunk_len: usize,
        f: impl Fn(usize, &mut [f32], gemm::Parallelism) -> Result<()> + Sync,
    ) -> Result<()> {
        let (task_parallel, parallelism) = self.parallelism();
        if chunk_len == 0 {
            return Ok(());
        }
        if task_parallel {
            out.par_chunks_mut(chunk_len)
                .enumerate()
                .try_for_each(|(task, chunk)| f(task, chunk, parallelism))
        } else {
            out.chunks_mut(chunk_len)
                .enumerate()
                .try_for_each(|(task, chunk)| f(task, chunk, parallelism))
        }
    }

    /// Per-task (rows, d) blocks, task-major, back into a (b, rows, h*d) layout appended to `dst`.
    fn gather_heads(&self, blocks: &[f32], rows: usize, dst: &mut Vec<f32>) {
        let (d, inner) = (self.head_dim, self.inner());
        let start = dst.len();
        dst.resize(start + self.batch * rows * inner, 0.0);
        dst[start..]
            .par_chunks_mut(rows * inner)
            .enumerate()
            .for_each(|(b, sample)| {
                for head in 0..self.heads {
                    let block = &blocks[(b * self.heads + head) * rows * d..][..rows * d];
                    for (r, src) in block.chunks(d).enumerate() {
                        sample[r * inner + head * d..][..d].copy_from_slice(src);
                    }
                }
            });
    }
}

impl CustomOp3 for TrainAttention {
    fn name(&self) -> &'static str {
        "sdfix-train-attention"
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
        let dims = AttentionDims::new(self.heads, l1, l2, l3)?;
        let q = contiguous_f32(s1, l1, "attention")?;
        let k = contiguous_f32(s2, l2, "attention")?;
        let v = contiguous_f32(s3, l3, "attention")?;
        let (n, m, d) = (dims.queries, dims.keys, dims.head_dim);
        let mut blocks = vec![0f32; dims.batch * dims.heads * n * d];
        dims.for_each_task(&mut blocks, n * d, |task, out, parallelism| {
            let mut probs = vec![0f32; n * m];
            dims.probabilities(
                q,
                k,
                self.mask.as_deref().map(|m| m.as_slice()),
                task,
                &mut probs,
                parallelism,
            )?;
            matmul_into(
                out,
                false,
                View::new(&probs, 0, (n, m), (m, 1)),
                dims.head(v, m, task),
                parallelism,
            )
        })?;
        let mut out = Vec::new();
        dims.gather_heads(&blocks, n, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let qkv = Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)?;
        let packed = grad.contiguous()?.apply_op2_no_bwd(
            &qkv,
            &AttentionBackward {
                heads: self.heads,
                mask: self.mask.clone(),
                q_shape: q.shape().clone(),
                kv_shape: k.shape().clone(),
            },
        )?;
        let [dq, dk, dv] = unpack(&packed, [q.dims(), k.dims(), v.dims()])?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// (grad (b, n, h*d), [q | k | v] flattened) -> packed [dq | dk | dv] in their own shapes:
/// `dV = P^T dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dP P)) / sqrt(d)`, `dQ = dS K`,
/// `dK = dS^T Q`.
struct AttentionBackward {
    heads: usize,
    mask: Option<Arc<Vec<f32>>>,
    q_shape: Shape,
    kv_shape: Shape,
}

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "sdfix-train-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let q_layout = Layout::contiguous(self.q_shape.clone());
        let kv_layout = Layout::contiguous(self.kv_shape.clone());
        let dims = AttentionDims::new(self.heads, &q_layout, &kv_layout, &kv_layout)?;
        let grad = contiguous_f32(s1, l1, "attention backward")?;
        let qkv = contiguous_f32(s2, l2, "attention backward")?;
        let (q_len, kv_len) = (self.q_shape.elem_count(), self.kv_shape.elem_count());
        if grad.len() != q_len || qkv.len() != q_len + 2 * kv_len {
            candle_core::bail!(
                "attention backward: gradient {:?} for query {:?}",
                l1.shape(),
                self.q_shape
            )
        }
        let (q, rest) = qkv.split_at(q_len);
        let (k, v) = rest.split_at(kv_len);
        let (n, m, d) = (dims.queries, dims.keys, dims.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        // Per task: [dq (n, d) | dk (m, d) | dv (m, d)].
        let task_len = (n + 2 * m) * d;
        let mut blocks = vec![0f32; dims.batch * dims.heads * task_len];
        dims.for_each_task(&mut blocks, task_len, |task, out, parallelism| {
            let (dq, rest) = out.split_at_mut(n * d);
            let (dk, dv) = rest.split_at_mut(m * d);
            let mut probs = vec![0f32; n * m];
            let mask = self.mask.as_deref().map(|m| m.as_slice());
            dims.probabilities(q, k, mask, task, &mut probs, parallelism)?;
            let d_out = dims.head(grad, n, task);
            // dV = P^T dO
            matmul_into(dv, false, View::new(&probs, 0, (m, n), (1, m)), d_out, parallelism)?;
            // dP = dO V^T
            let mut d_scores = vec![0f32; n * m];
            matmul_into(&mut d_scores, false, d_out, dims.head_t(v, m, task), parallelism)?;
            // dS = P (dP - rowsum(dP P)) * scale, in place of dP.
            for (ds, p) in d_scores.chunks_mut(m).zip(probs.chunks(m)) {
                let dot: f32 = ds.iter().zip(p).map(|(a, b)| a * b).sum();
                for (a, &b) in ds.iter_mut().zip(p) {
                    *a = b * (*a - dot) * scale;
                }
            }
            // dQ = dS K, dK = dS^T Q
            matmul_into(
                dq,
                false,
                View::new(&d_scores, 0, (n, m), (m, 1)),
                dims.head(k, m, task),
                parallelism,
            )?;
            matmul_into(
                dk,
                false,
                View::new(&d_scores, 0, (m, n), (1, m)),
                dims.head(q, n, task),
                parallelism,
            )
        })?;
        // Split the per-task blocks by kind, then each kind back into its (b, rows, h*d) layout.
        let tasks = dims.batch * dims.heads;
        let mut by_kind = [
            Vec::with_capacity(tasks * n * d),
            Vec::with_capacity(tasks * m * d),
            Vec::with_capacity(tasks * m * d),
        ];
        for block in blocks.chunks(task_len) {
            by_kind[0].extend_from_slice(&block[..n * d]);
            by_kind[1].extend_from_slice(&block[n * d..(n + m) * d]);
            by_kind[2].extend_from_slice(&block[(n + m) * d..]);
        }
        let mut packed = Vec::with_capacity(q_len + 2 * kv_len);
        dims.gather_heads(&by_kind[0], n, &mut packed);
        dims.gather_heads(&by_kind[1], m, &mut packed);
        dims.gather_heads(&by_kind[2], m, &mut packed);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::grad::testing::{compare, randn};
    use candle_core::{DType, Device};

    #[test]
    fn attention_gradients_match_candles() {
        for &(b, n, m, heads, d) in &[
            (2, 5, 7, 2, 4),
            (1, 64, 77, 4, 8),
            (3, 16, 16, 1, 32),
            (2, 77, 77, 2, 8),
        ] {
            // A causal mask where queries and keys are the same tokens (CLIP's).
            let mask = (n == m).then(|| crate::model::attention::causal_mask(n, &Device::Cpu).unwrap());
            let inputs = [
                randn(&[b, n, heads * d]),
                randn(&[b, m, heads * d]),
                randn(&[b, m, heads * d]),
            ];
            compare(
                &inputs,
                |t| attention(&t[0], &t[1], &t[2], heads, mask.as_ref()),
                |t| {
                    let split = |x: &Tensor, rows: usize| x.reshape((b, rows, heads, d))?.transpose(1, 2)?.contiguous();
                    let (q, k, v) = (split(&t[0], n)?, split(&t[1], m)?, split(&t[2], m)?);
                    let mut scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
                    if let Some(mask) = &mask {
                        scores = scores.broadcast_add(&mask.to_dtype(DType::F64)?)?;
                    }
                    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
                    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, heads * d))
                },
                2e-5,
                &format!("attention {b} {n} {m} {heads} {d}"),
            );
        }
    }
}
