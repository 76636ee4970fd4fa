//! Time of sdfix's attention for one shape: `cargo run --release --example attention_bench --
//! BATCH QUERIES KEYS HEADS HEAD_DIM [causal]`, best of 5 after a warm-up, on the rayon pool
//! (RAYON_NUM_THREADS). `scripts/attention_compare.sh` runs it beside PyTorch's SDPA.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sdfix::model::attention::{causal_mask, scaled_dot_product_attention};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dims: Vec<usize> = args.iter().take(5).filter_map(|a| a.parse().ok()).collect();
    let [b, n, m, heads, d] = dims[..] else {
        anyhow::bail!("usage: attention_bench BATCH QUERIES KEYS HEADS HEAD_DIM [causal]");
    };
    let causal = args.get(5).map(String::as_str) == Some("causal");
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (b, n, heads * d), &dev)?;
    let k = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
    let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
    let mask = if causal { Some(causal_mask(n, &dev)?) } else { None };
    scaled_dot_product_attention(&q, &k, &v, heads, mask.as_ref())?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        scaled_dot_product_attention(&q, &k, &v, heads, mask.as_ref())?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    let flops = (4 * b * heads * n * m * d) as f64;
    println!(
        "sdfix {b}x{n}x{m} heads={heads} d={d}{}: {:.2} ms, {:.1} GFLOP/s",
        if causal { " causal" } else { "" },
        best * 1e3,
        flops / best / 1e9
    );
    Ok(())
}
