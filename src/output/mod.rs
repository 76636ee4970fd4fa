//! What the front-ends write: PNGs with predictable names and atomic writes ([`png`]), the
//! settings recorded in each PNG ([`metadata`]: AUTOMATIC1111 `parameters` and the sdfix JSON),
//! the run manifest ([`manifest`]), and labelled grids and histograms ([`grid`]). The engine
//! returns images in memory; only this module touches the output folder.

pub mod grid;
pub mod manifest;
pub mod metadata;
pub mod png;
