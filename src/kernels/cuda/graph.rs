//! Lever 5 of issue 32: the UNet forward captured once per input shape as a CUDA graph and
//! replayed at every later step (`SDFIX_CUDA_GRAPHS=1`), so that its ~1,500 kernel launches cost
//! one graph launch of host time. candle 0.11 was made for this: its small-upload cache
//! (`enable_cuda_graph_htod_cache`, lever 1's `SDFIX_CUDA_HTOD_CACHE`, which this lever needs)
//! turns the dims/strides uploads of non-contiguous ops into device-to-device copies from
//! buffers that outlive the capture, and it refuses device-to-host copies while capturing.
//!
//! How a shape is handled ([`GraphCache::run`]):
//! 1. first call: the forward runs eagerly (its result is returned), which loads every kernel
//!    module, makes cuBLAS's and cuDNN's handles and plans, and fills the upload cache; then the
//!    inputs are copied into static tensors, the stream is captured while the same forward runs
//!    on them and its result is copied into a static output (every intermediate tensor is
//!    allocated and freed inside the graph, as stream-ordered allocation nodes);
//! 2. later calls: the new inputs are copied into the static ones, the graph is launched, and a
//!    copy of the static output is returned.
//!
//! The inputs are every tensor the forward reads that changes between calls: the latents, the
//! timestep embedding (computed outside the graph from the host's timestep) and the text
//! context; the cross-attention keys and values are recomputed inside the graph from the static
//! context, not taken from the caller's cache (whose tensors the graph could outlive). A shape
//! whose capture fails runs eagerly from then on, with one warning on stderr.

use candle_core::{DType, Result, Tensor};

/// What makes two forwards share a graph: each input's dims and dtype.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
type GraphKey = Vec<(Vec<usize>, DType)>;

/// The captured graphs of one model, by input shape.
#[derive(Default)]
pub struct GraphCache {
    #[cfg(feature = "cuda")]
    entries: std::sync::Mutex<std::collections::HashMap<GraphKey, imp::Entry>>,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GraphCache")
    }
}

impl GraphCache {
    /// `body(inputs)`, through a captured graph when lever 5 is on for the inputs' device (and
    /// the upload cache it needs is on); `body` must read nothing that changes between calls but
    /// `inputs`, and must keep nothing it makes.
    pub fn run(&self, inputs: &[&Tensor], body: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        let Some(first) = inputs.first() else {
            return body(&owned);
        };
        if !super::super::cuda_settings::lever_on(first.device(), |s| s.graphs && s.htod_cache) {
            return body(&owned);
        }
        self.run_captured(&owned, &body)
    }

    #[cfg(feature = "cuda")]
    fn run_captured(&self, inputs: &[Tensor], body: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
        imp::run(self, inputs, body)
    }

    /// Without CUDA there is nothing to capture (and the lever is never on).
    #[cfg(not(feature = "cuda"))]
    fn run_captured(&self, inputs: &[Tensor], body: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Tensor> {
        body(inputs)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result, Tensor};

    use super::{GraphCache, GraphKey};

    pub(super) enum Entry {
        Captured(Captured),
        /// Capture failed once: this shape runs eagerly.
        Failed,
    }

    pub(super) struct Captured {
        graph: CudaGraph,
        inputs: Vec<Tensor>,
        output: Tensor,
    }

    // SAFETY: a `CudaGraph` is a pair of driver handles and an `Arc` of its stream; it is only
    // launched under `GraphCache`'s mutex, which serialises every use of it (the driver's rule
    // for graph objects), and dropped through it.
    unsafe impl Send for Captured {}

    pub(super) fn run(
        cache: &GraphCache,
        inputs: &[Tensor],
        body: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let key: GraphKey = inputs.iter().map(|t| (t.dims().to_vec(), t.dtype())).collect();
        let mut entries = cache
            .entries
            .lock()
            .map_err(|_| candle_core::Error::Msg("CUDA graph cache: a capture panicked".into()))?;
        match entries.get(&key) {
            Some(Entry::Captured(captured)) => {
                for (fixed, input) in captured.inputs.iter().zip(inputs) {
                    fixed.slice_set(&input.contiguous()?, 0, 0)?;
                }
                captured.graph.launch().w()?;
                return captured.output.copy();
            }
            Some(Entry::Failed) => return body(inputs),
            None => {}
        }
        let output = body(inputs)?;
        let entry = match capture(inputs, &output, body) {
            Ok(captured) => Entry::Captured(captured),
            Err(e) => {
                eprintln!("warning: CUDA graph capture failed for inputs {key:?}, running without a graph: {e}");
                Entry::Failed
            }
        };
        entries.insert(key, entry);
        Ok(output)
    }

    fn capture(inputs: &[Tensor], output: &Tensor, body: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Captured> {
        let device = output.device();
        let Device::Cuda(cuda) = device else {
            candle_core::bail!("CUDA graphs need a CUDA device")
        };
        let fixed_inputs = inputs
            .iter()
            .map(|t| t.contiguous()?.copy())
            .collect::<Result<Vec<_>>>()?;
        let fixed_output = output.zeros_like()?;
        device.synchronize()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let captured = body(&fixed_inputs).and_then(|out| fixed_output.slice_set(&out.contiguous()?, 0, 0));
        // Always end the capture, so that a failed one leaves the stream usable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let Some(graph) = graph.w()? else {
            candle_core::bail!("the capture recorded no work")
        };
        graph.upload().w()?;
        Ok(Captured {
            graph,
            inputs: fixed_inputs,
            output: fixed_output,
        })
    }
}
