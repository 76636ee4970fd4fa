//! Our modules, built from the real SD 1.5 / 2.1-base / 2.1 configs (models/arch), ask for exactly
//! the tensors diffusers and transformers define for them: every name, every shape, nothing more,
//! nothing less (tests/fixtures/refs/arch_shapes.json, from `scripts/make_arch_refs.py`).
//!
//! No weights are needed: the backend hands out zero tensors of the requested shape, which are
//! calloc'd and never touched, so even SD 2.1's 865M-parameter UNet costs no real memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sdfix::config::read_json;

type Shapes = BTreeMap<String, Vec<usize>>;

#[derive(serde::Deserialize)]
struct ArchRefs {
    archs: HashMap<String, HashMap<String, Shapes>>,
}

/// Records the (name, shape) of every tensor requested; knows which names exist so that
/// prefix/naming detection (`contains_tensor`) sees what a real checkpoint would have.
struct Recorder {
    known: Shapes,
    requested: Arc<Mutex<Shapes>>,
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.requested
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros(s, DType::F32, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.known.contains_key(name)
    }
}

fn arch_config(arch: &str, component: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/arch")
        .join(arch)
        .join(component)
        .join("config.json")
}

/// Builds a module against `expected` and returns the tensors it asked for.
fn requested(expected: &Shapes, build: impl FnOnce(VarBuilder<'static>)) -> Shapes {
    let requested = Arc::new(Mutex::new(Shapes::new()));
    let backend = Recorder {
        known: expected.clone(),
        requested: requested.clone(),
    };
    build(VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu));
    let shapes = requested.lock().unwrap().clone();
    shapes
}

fn assert_same(ours: &Shapes, expected: &Shapes, what: &str) {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !ours.contains_key(*k) && !k.ends_with("position_ids"))
        .collect();
    let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{what}: we never ask for {} tensors, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        extra.is_empty(),
        "{what}: we ask for {} unknown tensors, e.g. {:?}",
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    for (name, shape) in ours {
        assert_eq!(shape, &expected[name], "{what}: shape of {name}");
    }
}

fn check_arch(arch: &str) {
    let refs: ArchRefs =
        read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/refs/arch_shapes.json")).unwrap();
    let expected = &refs.archs[arch];

    let unet_spec = read_json::<sdfix::config::unet::UNetConfig>(&arch_config(arch, "unet"))
        .unwrap()
        .resolve()
        .unwrap();
    let ours = requested(&expected["unet"], |vb| {
        sdfix::model::unet::UNet2DConditionModel::new(vb, &unet_spec).unwrap();
    });
    assert_same(&ours, &expected["unet"], &format!("{arch} unet"));

    let clip_config: sdfix::config::clip::ClipTextConfig = read_json(&arch_config(arch, "text_encoder")).unwrap();
    let ours = requested(&expected["text_encoder"], |vb| {
        sdfix::model::clip::ClipTextTransformer::new(vb, &clip_config).unwrap();
    });
    assert_same(&ours, &expected["text_encoder"], &format!("{arch} text encoder"));

    let vae_config: sdfix::config::vae::VaeConfig = read_json(&arch_config(arch, "vae")).unwrap();
    vae_config.validate().unwrap();
    assert_eq!(vae_config.downscale_factor(), 8);
    let ours = requested(&expected["vae"], |vb| {
        sdfix::model::vae::Vae::new(vb, &vae_config).unwrap();
    });
    // Sampling builds the decoder alone: the encoder's tensors are deliberately not read.
    let decoder: Shapes = expected["vae"]
        .iter()
        .filter(|(name, _)| {
            !sdfix::model::vae::Vae::UNREAD_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        })
        .map(|(name, shape)| (name.clone(), shape.clone()))
        .collect();
    assert!(decoder.len() > 100 && decoder.len() < expected["vae"].len());
    assert_same(&ours, &decoder, &format!("{arch} vae decoder"));
}

#[test]
fn sd15_modules_have_diffusers_tensors() {
    check_arch("sd1.5");
}

#[test]
fn sd21_base_modules_have_diffusers_tensors() {
    check_arch("sd2.1-base");
}

#[test]
fn sd21_768_v_modules_have_diffusers_tensors() {
    check_arch("sd2.1");
}
