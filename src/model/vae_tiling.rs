//! Tiled VAE decoding and encoding, as diffusers' `AutoencoderKL` does them after
//! `vae.enable_tiling()` (`models/autoencoders/autoencoder_kl.py`, 0.42.1: `_decode` /
//! `tiled_decode`, `_encode` / `_tiled_encode`, `blend_v`, `blend_h`).
//!
//! The VAE runs on overlapping tiles of the input, one at a time, so its activations are those of
//! one tile whatever the image size (the decoder's last blocks hold 128 channels at full
//! resolution: 2 GiB per tensor at 2048x2048 in f32). The sizes come from the VAE config:
//! - the image-side tile is `sample_size` (512 px for SD 1.x/2.x-base, 768 for SD 2.x-v, 1024 for
//!   SDXL), the latent-side tile `int(sample_size / 2^(len(block_out_channels) - 1))` (64 latent
//!   px for SD), and the overlap factor 0.25;
//! - decoding steps `int(latent_tile * 0.75)` latent px (48), blends `int(sample_tile * 0.25)`
//!   image rows and columns (128 px) with the tile above and the tile to the left, and keeps
//!   `sample_tile - blend` of each tile (384 px);
//! - encoding mirrors it: steps `int(sample_tile * 0.75)` px, blends `int(latent_tile * 0.25)`
//!   latent px and keeps `latent_tile - blend`. The blended output is the encoder's moments
//!   (mean and log variance, after `quant_conv`), which the caller then splits and clamps, as
//!   diffusers builds its `DiagonalGaussianDistribution` from the tiled moments.
//!
//! Tiles start at 0, stride, 2 stride, ... while below the input's side, so the last tile of a
//! row or column is whatever is left (down to one pixel). In raster order each output tile is
//! blended with the tile above (`blend_v`), then with the tile to its left (`blend_h`), each
//! neighbour as already blended itself: diffusers writes the blend into the tile in place, and
//! later tiles read it. Then the tile is cropped to its top-left `keep` x `keep` and the crops are
//! put side by side. Diffusers tiles only when a side of the input is larger than the tile;
//! otherwise the VAE runs once on the whole input, as without tiling.
//!
//! Diffusers decodes every tile before blending any; this blends each tile as it is made, keeping
//! only the row above: the same numbers, without every tile in memory at once.
//!
//! Tiling changes the picture: each tile's group norms and the mid block's attention see that tile
//! alone, so tiles differ slightly in brightness and contrast where the blend does not reach
//! (diffusers' docstring: "You may still see tile-sized changes in the output").

use candle_core::{DType, Result, Tensor};

use crate::config::vae::{SampleSize, VaeConfig};

/// diffusers' `tile_overlap_factor`.
pub const TILE_OVERLAP: f64 = 0.25;

/// How one direction (decode or encode) cuts its input into tiles and joins their outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileGrid {
    /// Side of an input tile (latent px for decoding, image px for encoding).
    pub tile: usize,
    /// Input px from one tile's start to the next's: `int(tile * (1 - overlap))`.
    pub stride: usize,
    /// Output rows (columns) blended with the tile above (to the left): `int(output tile * overlap)`.
    pub blend: usize,
    /// Output rows and columns kept of each tile: `output tile - blend`.
    pub keep: usize,
}

/// Both directions' tiles for one VAE config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    pub decode: TileGrid,
    pub encode: TileGrid,
}

/// Python's `int(x)` of a non-negative float: truncation.
fn truncate(x: f64) -> usize {
    x as usize
}

impl VaeTiling {
    /// The tiles diffusers' `AutoencoderKL.__init__` sets up for `config`. Refuses what diffusers
    /// cannot tile or would tile into an image of another size:
    /// - a list `sample_size`: diffusers keeps the list as `tile_sample_min_size`, and its tiled
    ///   decode and encode fail on it (TypeError);
    /// - a stride of 0 (a tile of one latent px): Python's `range` refuses a step of 0;
    /// - a stride that is not the kept part (`sample_size` not a multiple of 4 x the VAE's
    ///   factor): diffusers would return a picture of another size than asked. SD's 512, 768
    ///   and 1024 all are.
    pub fn new(config: &VaeConfig) -> std::result::Result<Self, String> {
        let sample_tile = match config.sample_size {
            SampleSize::Side(side) => side,
            SampleSize::Sides(ref sides) => {
                return Err(format!(
                    "this VAE's sample_size is a list ({sides:?}); diffusers cannot tile it (its tiled decode and \
                     encode fail on a list), nor does sdfix"
                ))
            }
        };
        let factor = config.downscale_factor();
        // `int(sample_size / 2 ** (len(block_out_channels) - 1))`, a float division.
        let latent_tile = truncate(sample_tile as f64 / factor as f64);
        let grid = |tile: usize, output_tile: usize| {
            let blend = truncate(output_tile as f64 * TILE_OVERLAP);
            TileGrid {
                tile,
                stride: truncate(tile as f64 * (1.0 - TILE_OVERLAP)),
                blend,
                keep: output_tile - blend,
            }
        };
        let tiling = Self {
            decode: grid(latent_tile, sample_tile),
            encode: grid(sample_tile, latent_tile),
        };
        let fits = tiling.decode.stride > 0
            && tiling.encode.stride > 0
            && tiling.decode.stride * factor == tiling.decode.keep
            && tiling.encode.keep * factor == tiling.encode.stride;
        if !fits {
            return Err(format!(
                "this VAE's sample_size {sample_tile} does not tile evenly (it must be a positive multiple of \
                 {}): diffusers' tiles would make a picture of another size",
                4 * factor
            ));
        }
        Ok(tiling)
    }
}

impl TileGrid {
    /// Whether an input of `height` x `width` is tiled: diffusers tiles only when a side is
    /// larger than the tile.
    pub fn applies(&self, height: usize, width: usize) -> bool {
        height > self.tile || width > self.tile
    }

    /// `run` on each tile of `input` (b, c, H, W), the outputs blended and joined: diffusers'
    /// `tiled_decode` / `_tiled_encode` around the network `run`.
    pub fn run(&self, input: &Tensor, mut run: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (_, _, height, width) = input.dims4()?;
        // The previous row's outputs, blended, uncropped (what `blend_v` reads).
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for top in (0..height).step_by(self.stride) {
            let band = input.narrow(2, top, self.tile.min(height - top))?;
            let mut row: Vec<Tensor> = Vec::new();
            let mut kept = Vec::new();
            for (column, left) in (0..width).step_by(self.stride).enumerate() {
                let tile = band.narrow(3, left, self.tile.min(width - left))?.contiguous()?;
                let mut out = run(&tile)?;
                if let Some(upper) = above.get(column) {
                    out = blend_v(upper, &out, self.blend)?;
                }
                if let Some(previous) = row.last() {
                    out = blend_h(previous, &out, self.blend)?;
                }
                let (_, _, h, w) = out.dims4()?;
                kept.push(out.narrow(2, 0, self.keep.min(h))?.narrow(3, 0, self.keep.min(w))?);
                row.push(out);
            }
            rows.push(Tensor::cat(&kept, 3)?);
            above = row;
        }
        Tensor::cat(&rows, 2)
    }
}

/// diffusers' `blend_v`: the first `extent` rows of `tile` (b, c, h, w) faded in from the last
/// `extent` rows of `above`, `extent = min(above's h, tile's h, blend)`:
/// `tile[y] = above[y - extent] * (1 - y / extent) + tile[y] * (y / extent)`.
pub fn blend_v(above: &Tensor, tile: &Tensor, blend: usize) -> Result<Tensor> {
    blend_along(above, tile, blend, 2)
}

/// diffusers' `blend_h`: [`blend_v`] along columns, from the tile to the left.
pub fn blend_h(left: &Tensor, tile: &Tensor, blend: usize) -> Result<Tensor> {
    blend_along(left, tile, blend, 3)
}

fn blend_along(previous: &Tensor, tile: &Tensor, blend: usize, dim: usize) -> Result<Tensor> {
    let extent = blend.min(previous.dim(dim)?).min(tile.dim(dim)?);
    if extent == 0 {
        return Ok(tile.clone());
    }
    let side = tile.dim(dim)?;
    // The weights as torch takes a Python float times an f32 tensor: the float rounded to f32.
    let weights = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
        let values: Vec<f32> = (0..extent).map(|y| f(y as f64 / extent as f64) as f32).collect();
        let shape = if dim == 2 { (1, 1, extent, 1) } else { (1, 1, 1, extent) };
        let weights = Tensor::from_vec(values, shape, tile.device())?;
        match tile.dtype() {
            DType::F32 => Ok(weights),
            dtype => weights.to_dtype(dtype),
        }
    };
    let (fade_out, fade_in) = (weights(&|t| 1.0 - t)?, weights(&|t| t)?);
    let from = previous.narrow(dim, previous.dim(dim)? - extent, extent)?;
    let head = tile.narrow(dim, 0, extent)?;
    let blended = (from.broadcast_mul(&fade_out)? + head.broadcast_mul(&fade_in)?)?;
    if extent == side {
        return Ok(blended);
    }
    Tensor::cat(&[&blended, &tile.narrow(dim, extent, side - extent)?], dim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(sample_size: SampleSize, blocks: usize) -> VaeConfig {
        VaeConfig {
            sample_size,
            block_out_channels: vec![32; blocks],
            ..VaeConfig::default()
        }
    }

    /// SD's VAE (sample_size 512, 4 blocks): diffusers' 64-latent tiles, stride 48, blend 128 px,
    /// 384 px kept; encoding 512 px tiles, stride 384, blend 16 latent px, 48 kept.
    #[test]
    fn sd_tiles_are_diffusers_sizes() {
        let tiling = VaeTiling::new(&config(SampleSize::Side(512), 4)).unwrap();
        assert_eq!(
            tiling.decode,
            TileGrid {
                tile: 64,
                stride: 48,
                blend: 128,
                keep: 384
            }
        );
        assert_eq!(
            tiling.encode,
            TileGrid {
                tile: 512,
                stride: 384,
                blend: 16,
                keep: 48
            }
        );
        let sd2 = VaeTiling::new(&config(SampleSize::Side(768), 4)).unwrap();
        assert_eq!((sd2.decode.tile, sd2.decode.stride, sd2.decode.keep), (96, 72, 576));
    }

    #[test]
    fn what_diffusers_cannot_tile_is_refused() {
        let list = VaeTiling::new(&config(SampleSize::Sides(vec![512, 512]), 4)).unwrap_err();
        assert!(list.contains("is a list"), "{list}");
        let uneven = VaeTiling::new(&config(SampleSize::Side(520), 4)).unwrap_err();
        assert!(uneven.contains("multiple of 32"), "{uneven}");
        assert!(VaeTiling::new(&config(SampleSize::Side(4), 4)).is_err());
    }

    #[test]
    fn tiles_only_inputs_larger_than_a_tile() {
        let grid = VaeTiling::new(&config(SampleSize::Side(512), 4)).unwrap().decode;
        assert!(!grid.applies(64, 64));
        assert!(grid.applies(65, 64));
        assert!(grid.applies(64, 65));
    }

    /// The blend on hand-worked numbers: extent 2 fades row 0 fully from `above`'s row h-2 and
    /// row 1 half; an `above` of one row limits the extent to 1.
    #[test]
    fn blend_v_fades_from_the_rows_above() -> Result<()> {
        let device = Device::Cpu;
        let above = Tensor::new(&[10f32, 20., 30.], &device)?.reshape((1, 1, 3, 1))?;
        let tile = Tensor::new(&[1f32, 2., 3., 4.], &device)?.reshape((1, 1, 4, 1))?;
        let out = blend_v(&above, &tile, 2)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(out, [20., 0.5 * 30. + 0.5 * 2., 3., 4.]);
        let short = Tensor::new(&[7f32], &device)?.reshape((1, 1, 1, 1))?;
        let out = blend_v(&short, &tile, 2)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(out, [7., 2., 3., 4.]);
        let left = above.reshape((1, 1, 1, 3))?;
        let out = blend_h(&left, &tile.reshape((1, 1, 1, 4))?, 2)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(out, [20., 16., 3., 4.]);
        Ok(())
    }

    /// With an identity "network" and a blend as wide as the overlap, the tile above (to the
    /// left) holds the same pixels as the rows (columns) it fades into, so the joined output is
    /// the input: the grid covers every pixel, once, in place, uneven last tiles included.
    #[test]
    fn the_grid_covers_the_input_exactly() -> Result<()> {
        let grid = TileGrid {
            tile: 8,
            stride: 6,
            blend: 2,
            keep: 6,
        };
        for (h, w) in [(9, 9), (20, 13), (13, 7), (12, 12), (8, 8)] {
            let input = Tensor::arange(0f32, (h * w) as f32, &Device::Cpu)?.reshape((1, 1, h, w))?;
            let mut calls = 0;
            let out = grid.run(&input, |tile| {
                calls += 1;
                Ok(tile.clone())
            })?;
            assert_eq!(calls, h.div_ceil(6) * w.div_ceil(6), "{h}x{w}");
            assert_eq!(
                out.flatten_all()?.to_vec1::<f32>()?,
                input.flatten_all()?.to_vec1::<f32>()?,
                "{h}x{w}"
            );
        }
        Ok(())
    }
}
