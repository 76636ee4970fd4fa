//! Lever 2 of issue 32: 2-D convolution through cuDNN, our own call sequence on cudarc's cuDNN API
//! (`cudnn` builds, `SDFIX_CUDA_CUDNN_CONV=1`). What candle 0.11's cuDNN path
//! (`candle-core/src/cuda_backend/cudnn.rs::launch_conv2d`) does per call and this does once:
//!
//! - descriptors (input, filter, convolution, output, bias, activation) and the algorithm are
//!   made once per (device, dtype, shape, stride, padding) and cached ([`imp::Plan`]); candle
//!   creates them and asks cuDNN's heuristics on every call;
//! - one workspace per device, grown to the largest plan's need and kept; candle allocates and
//!   zero-fills a fresh one on every call;
//! - tensor-op math for f16/bf16 (and for f32 when `SDFIX_CUDA_TF32=1`; exact FMA math otherwise,
//!   the parity mode), with f32 accumulation for f16 (candle computes f16 convolutions in f16);
//! - the bias fused into the convolution (`cudnnConvolutionBiasActivationForward` with the
//!   identity activation, which cuDNN runs with `IMPLICIT_PRECOMP_GEMM` only); when cuDNN refuses
//!   that for a shape, the plan falls back to the heuristics' algorithm and a separate bias add.
//!
//! Checked against candle's conv2d + bias by `sdfix kernel-check` ([`super::parity`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::kernels::conv::ConvSpec;

/// Whether this build has the cuDNN convolution (`--features cudnn`).
pub const AVAILABLE: bool = cfg!(feature = "cudnn");

/// `xs` (b, c_in, h, w) convolved with `weight` (c_out, c_in, k, k) plus `bias` (c_out), all in
/// one dtype on CUDA (made contiguous).
pub fn conv2d(xs: &Tensor, weight: &Tensor, bias: &Tensor, spec: ConvSpec) -> Result<Tensor> {
    let ys = xs
        .contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &CudnnConv { spec })?;
    // The op ran on this thread just now; a plan without the fused bias left it to us.
    if BIAS_FUSED.with(std::cell::Cell::get) {
        Ok(ys)
    } else {
        ys.broadcast_add(&bias.reshape((1, (), 1, 1))?)
    }
}

thread_local! {
    /// Whether the last convolution on this thread added the bias itself.
    static BIAS_FUSED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

struct CudnnConv {
    #[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
    spec: ConvSpec,
}

impl CustomOp3 for CudnnConv {
    fn name(&self) -> &'static str {
        "sdfix-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cuda_only(self.name())
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        imp::conv2d(self.spec, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(feature = "cudnn")]
mod imp {
    use std::any::Any;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::safe::{
        ActivationDescriptor, ConvBiasActivationForward, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
        FilterDescriptor, TensorDescriptor,
    };
    use candle_core::cuda_backend::cudarc::cudnn::sys;
    use candle_core::cuda_backend::cudarc::driver::{
        sys as driver_sys, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, DeviceSlice, SyncOnDrop,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, WithDType};

    use crate::kernels::conv::ConvSpec;

    /// What makes two calls share a plan.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        dtype: DType,
        batch: usize,
        c_in: usize,
        h: usize,
        w: usize,
        spec: ConvSpec,
    }

    /// The descriptors and algorithm of one shape, made once.
    struct Plan<T: CudnnDataType> {
        conv: ConvDescriptor<f32>,
        act: ActivationDescriptor<f32>,
        x: TensorDescriptor<T>,
        w: FilterDescriptor<T>,
        bias: TensorDescriptor<T>,
        y: TensorDescriptor<T>,
        algo: sys::cudnnConvolutionFwdAlgo_t,
        /// Bias fused (`IMPLICIT_PRECOMP_GEMM` with the identity activation) or added after;
        /// turned off for good when cuDNN refuses the fused call for this shape.
        fused_bias: std::cell::Cell<bool>,
        out_hw: (usize, usize),
    }

    /// Per device: the cuDNN handle, the plans (each a `Plan<T>` for its key's dtype) and the one
    /// workspace.
    struct State {
        cudnn: Arc<Cudnn>,
        plans: HashMap<Key, Box<dyn Any>>,
        workspace: Option<CudaSlice<u8>>,
    }

    // cuDNN handles are neither Send nor Sync (candle keeps its own per thread the same way).
    thread_local! {
        static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
    }

    fn err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("cudnn convolution: {e:?}"))
    }

    /// A device pointer handed to cuDNN without a borrow: the output passed as the `z` input
    /// that `alpha2 = 0` ignores (cudarc's safe call wants `z` as a second, shared reference).
    struct Alias<'a> {
        ptr: driver_sys::CUdeviceptr,
        len: usize,
        stream: &'a Arc<CudaStream>,
    }

    impl<T> DeviceSlice<T> for Alias<'_> {
        fn len(&self) -> usize {
            self.len
        }
        fn stream(&self) -> &Arc<CudaStream> {
            self.stream
        }
    }

    impl<T> DevicePtr<T> for Alias<'_> {
        fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (driver_sys::CUdeviceptr, SyncOnDrop<'a>) {
            // Every op of a device runs on its one stream: nothing to wait for or record.
            (self.ptr, SyncOnDrop::Record(None))
        }
    }

    fn make_plan<T: CudnnDataType + 'static>(cudnn: &Arc<Cudnn>, key: &Key, tf32: bool) -> Result<Plan<T>> {
        let s = key.spec;
        let (k, p, st) = (s.kernel as i32, s.padding as i32, s.stride as i32);
        let mut conv = cudnn
            .create_conv2d::<f32>(
                [p, p],
                [st, st],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(err)?;
        let math = if key.dtype != DType::F32 || tf32 {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        conv.set_math_type(math).map_err(err)?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let oh = (key.h + 2 * s.padding - s.kernel) / s.stride + 1;
        let ow = (key.w + 2 * s.padding - s.kernel) / s.stride + 1;
        let i = |v: usize| v as i32;
        let x = cudnn
            .create_4d_tensor::<T>(nchw, [i(key.batch), i(key.c_in), i(key.h), i(key.w)])
            .map_err(err)?;
        let w = cudnn
            .create_4d_filter::<T>(nchw, [i(s.out_channels), i(key.c_in), k, k])
            .map_err(err)?;
        let y = cudnn
            .create_4d_tensor::<T>(nchw, [i(key.batch), i(s.out_channels), i(oh), i(ow)])
            .map_err(err)?;
        let bias = cudnn
            .create_4d_tensor::<T>(nchw, [1, i(s.out_channels), 1, 1])
            .map_err(err)?;
        let act = cudnn
            .create_activation::<f32>(
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
                sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                0.0,
            )
            .map_err(err)?;
        let forward = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        // The fused bias needs IMPLICIT_PRECOMP_GEMM; a shape it cannot run takes the
        // heuristics' choice and a separate bias add.
        let precomp = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
        let (algo, fused_bias) = match forward.get_workspace_size(precomp) {
            Ok(_) => (precomp, true),
            Err(_) => (forward.pick_algorithm().map_err(err)?, false),
        };
        Ok(Plan {
            conv,
            act,
            x,
            w,
            bias,
            y,
            algo,
            fused_bias: std::cell::Cell::new(fused_bias),
            out_hw: (oh, ow),
        })
    }

    /// Runs one convolution with the cached plan of its shape (made on first use).
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudnnDataType + DeviceRepr + WithDType + 'static>(
        dev: &CudaDevice,
        key: Key,
        x: CudaView<'_, T>,
        w: CudaView<'_, T>,
        b: CudaView<'_, T>,
    ) -> Result<(CudaSlice<T>, (usize, usize), bool)> {
        let tf32 = crate::kernels::cuda_settings::applied().tf32;
        STATES.with(|states| {
            let mut states = states.borrow_mut();
            let state = match states.entry(dev.id()) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(State {
                    cudnn: Cudnn::new(dev.cuda_stream()).map_err(err)?,
                    plans: HashMap::new(),
                    workspace: None,
                }),
            };
            if !state.plans.contains_key(&key) {
                let plan = make_plan::<T>(&state.cudnn, &key, tf32)?;
                state.plans.insert(key, Box::new(plan));
            }
            let Some(plan) = state.plans.get(&key).and_then(|p| p.downcast_ref::<Plan<T>>()) else {
                candle_core::bail!("cudnn convolution: plan of the wrong dtype")
            };
            let forward = ConvForward {
                conv: &plan.conv,
                x: &plan.x,
                w: &plan.w,
                y: &plan.y,
            };
            let needed = forward.get_workspace_size(plan.algo).map_err(err)?;
            if state.workspace.as_ref().is_none_or(|ws| ws.len() < needed) {
                state.workspace = Some(dev.alloc_zeros::<u8>(needed.max(1))?);
            }
            let Some(workspace) = state.workspace.as_mut() else {
                candle_core::bail!("cudnn convolution: no workspace")
            };
            let (oh, ow) = plan.out_hw;
            let n = key.batch * key.spec.out_channels * oh * ow;
            // SAFETY: cuDNN writes every output element (beta / alpha2 are 0).
            let mut y = unsafe { dev.alloc::<T>(n)? };
            let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
            let mut fused_done = false;
            if plan.fused_bias.get() {
                let stream = dev.cuda_stream();
                let (y_ptr, guard) = y.device_ptr(&stream);
                drop(guard);
                let alias = |ptr, len| Alias {
                    ptr,
                    len,
                    stream: &stream,
                };
                let (x_ptr, guard) = x.device_ptr(&stream);
                drop(guard);
                let (b_ptr, guard) = b.device_ptr(&stream);
                drop(guard);
                let (x, z, b) = (alias(x_ptr, x.len()), alias(y_ptr, n), alias(b_ptr, b.len()));
                let fused = ConvBiasActivationForward {
                    conv: &plan.conv,
                    act: &plan.act,
                    x: &plan.x,
                    w: &plan.w,
                    z: &plan.y,
                    bias: &plan.bias,
                    y: &plan.y,
                };
                // SAFETY: x, w, bias and y match the plan's descriptors (shapes from the key,
                // contiguous NCHW, dtype T); z aliases y and is not read (alpha2 = 0).
                let launched = unsafe {
                    fused.launch::<CudaSlice<u8>, _, _, _>(
                        plan.algo,
                        Some(&mut *workspace),
                        (one, zero),
                        &x,
                        &w,
                        &z,
                        &b,
                        &mut y,
                    )
                };
                // A refusal (CUDNN_STATUS_NOT_SUPPORTED) is known before any work is queued.
                fused_done = launched.is_ok();
                plan.fused_bias.set(fused_done);
            }
            if !fused_done {
                // SAFETY: as above, without the bias (added by the caller).
                unsafe {
                    forward.launch::<CudaSlice<u8>, _, _, _>(plan.algo, Some(workspace), (one, zero), &x, &w, &mut y)
                }
                .map_err(err)?;
            }
            Ok((y, (oh, ow), fused_done))
        })
    }

    fn view<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout) -> Result<CudaView<'a, T>> {
        super::super::contiguous_view(slice, layout, "cudnn convolution")
    }

    pub(super) fn conv2d(
        spec: ConvSpec,
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
        (s3, l3): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let (batch, c_in, h, w) = l1.shape().dims4()?;
        let expected = [spec.out_channels, c_in, spec.kernel, spec.kernel];
        if l2.shape().dims() != expected || l3.shape().elem_count() != spec.out_channels || c_in != spec.in_channels {
            candle_core::bail!(
                "cudnn convolution: input {:?}, weight {:?}, bias {:?} do not fit {spec:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        if h + 2 * spec.padding < spec.kernel || w + 2 * spec.padding < spec.kernel || spec.stride == 0 {
            candle_core::bail!("cudnn convolution: a {h}x{w} input is smaller than the kernel")
        }
        let key = Key {
            dtype: s1.dtype(),
            batch,
            c_in,
            h,
            w,
            spec,
        };
        let dev = &s1.device;
        let (slice, (oh, ow), fused) = match (&s1.slice, &s2.slice, &s3.slice) {
            (CudaStorageSlice::F32(x), CudaStorageSlice::F32(wt), CudaStorageSlice::F32(b)) => {
                let (y, hw, fused) = launch(dev, key, view(x, l1)?, view(wt, l2)?, view(b, l3)?)?;
                (CudaStorageSlice::F32(y), hw, fused)
            }
            (CudaStorageSlice::F16(x), CudaStorageSlice::F16(wt), CudaStorageSlice::F16(b)) => {
                let (y, hw, fused) = launch(dev, key, view(x, l1)?, view(wt, l2)?, view(b, l3)?)?;
                (CudaStorageSlice::F16(y), hw, fused)
            }
            (CudaStorageSlice::BF16(x), CudaStorageSlice::BF16(wt), CudaStorageSlice::BF16(b)) => {
                let (y, hw, fused) = launch(dev, key, view(x, l1)?, view(wt, l2)?, view(b, l3)?)?;
                (CudaStorageSlice::BF16(y), hw, fused)
            }
            _ => candle_core::bail!(
                "cudnn convolution: input, weight and bias must all be f32, f16 or bf16 alike, got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        super::BIAS_FUSED.with(|f| f.set(fused));
        Ok(super::super::output(
            slice,
            dev,
            Shape::from((batch, spec.out_channels, oh, ow)),
        ))
    }
}
