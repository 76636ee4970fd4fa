//! Every error the server answers, in one JSON shape: `{"error": kind, "detail": message}`, the
//! message naming the request field at fault. A body that cannot be read (over the limit) and
//! one that is not the JSON expected are mapped into it too.

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Seconds a client is told to wait when the queue is full: about one small job.
const RETRY_AFTER_SECONDS: &str = "5";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A short machine-readable kind: `invalid_request`, `not_found`, ...
    pub error: &'static str,
    /// What was wrong, naming the field.
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            error,
            detail: detail.into(),
        }
    }

    /// A request field with a bad value (422, as A1111's FastAPI answers).
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn queue_full(capacity: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            format!("{capacity} requests are already waiting (the server's --queue); retry later"),
        )
    }

    pub fn internal(err: &anyhow::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{err:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.error, "detail": self.detail}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"sdfix\""),
            );
        }
        response
    }
}

impl From<BytesRejection> for ApiError {
    /// A body that could not be read: over the limit (413), or cut off.
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        Self::new(status, error, format!("body: {}", rejection.body_text()))
    }
}

impl From<serde_path_to_error::Error<serde_json::Error>> for ApiError {
    /// A field of the wrong type, named by its path (`steps`, `override_settings.x`).
    fn from(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = err.path().to_string();
        let field = if path == "." { "body".to_string() } else { path };
        Self::invalid(format!("{field}: {}", err.inner()))
    }
}
