//! Model files and (later) the candle modules built from them.

pub mod files;
