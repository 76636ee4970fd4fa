//! `sdfix serve`: the flags of the HTTP server. The server itself (routes, queue, worker) is
//! [`crate::serve`]; this file only says what can be set and hands it over resolved.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::args::{at_least_one, DeviceArgs, PreviewArgs};
use crate::serve::{self, Auth, Limits, ServeConfig};
use crate::weights::demo::DEFAULT_MODEL;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model loaded at start (a built-in demo name, a diffusers folder or a hub repo id);
    /// clients switch between it, the demo models and --models-dir by name.
    #[arg(long, value_name = "DIR|REPO|demo", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Address and port to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub listen: SocketAddr,

    /// Require HTTP basic auth with these credentials on every route (as AUTOMATIC1111's
    /// --api-auth).
    #[arg(long, value_name = "USER:PASS")]
    pub api_auth: Option<String>,

    /// A folder of diffusers model folders, offered to clients by folder name.
    #[arg(long, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Where requests with "save_images": true are written, with manifest.jsonl.
    #[arg(long, default_value = "outputs")]
    pub out_dir: PathBuf,

    /// The most pixels (width x height) one image may have.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_PIXELS, value_parser = at_least_one)]
    pub max_pixels: usize,

    /// The most sampling steps a request may ask for.
    #[arg(long, default_value_t = serve::DEFAULT_MAX_STEPS, value_parser = at_least_one)]
    pub max_steps: usize,

    /// Images per UNet batch: queued requests with equal settings are run together up to this
    /// many images; also the most images one request's batch_size may ask for.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    pub max_batch: usize,

    /// Requests that may wait behind the running one; more are answered 503.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub queue: usize,

    #[command(flatten)]
    pub previews: PreviewArgs,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `USER:PASS`, both non-empty.
fn parse_auth(text: &str) -> Result<Auth> {
    let Some((user, password)) = text.split_once(':') else {
        bail!("--api-auth takes USER:PASS");
    };
    if user.is_empty() || password.is_empty() {
        bail!("--api-auth takes USER:PASS with neither empty");
    }
    Ok(Auth {
        user: user.to_string(),
        password: password.to_string(),
    })
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let auth = args.api_auth.as_deref().map(parse_auth).transpose()?;
    if !args.listen.ip().is_loopback() && auth.is_none() {
        eprintln!(
            "warning: listening on {} without --api-auth: anyone who can reach it can run jobs",
            args.listen
        );
    }
    if let Some(dir) = &args.models_dir {
        if !dir.is_dir() {
            bail!("--models-dir {}: no such folder", dir.display());
        }
    }
    let preview = args.previews.resolve()?;
    let (device, dtype) = args.device.resolve()?;
    let config = ServeConfig {
        model: args.model.clone(),
        listen: args.listen,
        auth,
        models_dir: args.models_dir.clone(),
        out_dir: args.out_dir.clone(),
        limits: Limits {
            max_pixels: args.max_pixels,
            max_steps: args.max_steps,
            max_batch: args.max_batch,
            queue: args.queue,
        },
        device,
        dtype,
        preview,
    };
    serve::run(config).context("sdfix serve")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_needs_both_parts() {
        assert!(parse_auth("user:pass").is_ok());
        assert_eq!(parse_auth("a:b:c").unwrap().password, "b:c");
        for bad in ["user", ":pass", "user:", ""] {
            assert!(parse_auth(bad).is_err(), "{bad}");
        }
    }
}
