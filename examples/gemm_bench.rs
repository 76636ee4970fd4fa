//! Throughput of one f32 matrix product in the gemm crate, as sdfix's CPU kernels call it:
//! `cargo run --release --example gemm_bench -- M K N [pool|single] [in-out|out-in]`.
//! `pool` lets gemm split the product over the rayon pool (RAYON_NUM_THREADS); `single` runs it on
//! one thread. The rhs is a weight stored (in, out) (how our linear layers keep it) or (out, in).
//! `scripts/gemm_compare.sh` runs it beside PyTorch.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dims: Vec<usize> = args.iter().take(3).filter_map(|a| a.parse().ok()).collect();
    let [m, k, n] = dims[..] else {
        eprintln!("usage: gemm_bench M K N [pool|single] [in-out|out-in]");
        std::process::exit(2);
    };
    let pool = args.get(3).map(String::as_str) != Some("single");
    let in_out = args.get(4).map(String::as_str) != Some("out-in");
    let (lhs, rhs) = (vec![1.0f32; m * k], vec![1.0f32; k * n]);
    let mut dst = vec![0.0f32; m * n];
    let (rhs_cs, rhs_rs) = if in_out { (1, n as isize) } else { (k as isize, 1) };
    let parallelism = if pool {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let mut best = f64::MAX;
    for _ in 0..6 {
        let started = Instant::now();
        // SAFETY: dst (m x n), lhs (m x k) row-major, rhs (k x n) with the strides above; all
        // three buffers have exactly those sizes.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    let threads = if pool { rayon::current_num_threads() } else { 1 };
    println!(
        "gemm {m}x{k}x{n} {} threads={threads}: {:.2} ms, {:.1} GFLOP/s",
        if in_out { "(in,out)" } else { "(out,in)" },
        best * 1e3,
        2.0 * (m * k * n) as f64 / best / 1e9
    );
}
