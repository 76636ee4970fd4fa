//! `text_encoder/config.json`, as transformers' `CLIPTextConfig` reads it (its defaults).

use anyhow::{ensure, Result};
use serde::Deserialize;

/// The keys of `CLIPTextConfig` that the text transformer uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// transformers' pooling: with the legacy value 2 the pooled token is the highest id
    /// (`argmax`, which is the first EOS for CLIP's vocabulary), otherwise the first `eos_token_id`.
    pub eos_token_id: u32,
    /// The projection's width (`CLIPTextModelWithProjection`, SDXL's second encoder).
    pub projection_dim: Option<usize>,
    /// transformers' class names: `CLIPTextModelWithProjection` has a `text_projection`.
    pub architectures: Vec<String>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            projection_dim: None,
            architectures: Vec::new(),
        }
    }
}

/// The MLP activation of a CLIP layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SD 1.x.
    QuickGelu,
    /// Exact erf GELU: OpenCLIP ViT-H, SD 2.x.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipTextConfig {
    /// Whether the model is transformers' `CLIPTextModelWithProjection`.
    pub fn with_projection(&self) -> bool {
        self.architectures.iter().any(|a| a == "CLIPTextModelWithProjection")
    }

    pub fn activation(&self) -> Result<ClipActivation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(ClipActivation::QuickGelu),
            "gelu" => Ok(ClipActivation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(ClipActivation::GeluTanh),
            other => anyhow::bail!("hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new)"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.activation()?;
        ensure!(
            self.num_attention_heads > 0 && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        Ok(())
    }
}
