//! Errors as API clients expect them: a 4xx or 5xx status with a JSON body
//! in the dialect of the route (OpenAI's `{"error": {...}}`, Anthropic's
//! `{"type": "error", "error": {...}}`), and `Retry-After` where waiting
//! helps. Every way a request can fail ends here, never in a panic.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Which API's error shape to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `param`: the request field at fault, if one is.
    pub param: Option<&'static str>,
    /// OpenAI's `code`, e.g. `context_length_exceeded`.
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u32>,
    pub dialect: Dialect,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after_s: None,
            dialect: Dialect::OpenAi,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn dialect(mut self, dialect: Dialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// The `type` of the error object, by status, in each dialect.
    fn kind(&self) -> &'static str {
        match (self.dialect, self.status.as_u16()) {
            (Dialect::OpenAi, 401) => "authentication_error",
            (Dialect::OpenAi, 404) => "not_found_error",
            (Dialect::OpenAi, 429) => "rate_limit_error",
            (Dialect::OpenAi, 400..=499) => "invalid_request_error",
            (Dialect::OpenAi, _) => "server_error",
            (Dialect::Anthropic, 401) => "authentication_error",
            (Dialect::Anthropic, 404) => "not_found_error",
            (Dialect::Anthropic, 413) => "request_too_large",
            (Dialect::Anthropic, 429) => "rate_limit_error",
            (Dialect::Anthropic, 503) => "overloaded_error",
            (Dialect::Anthropic, 400..=499) => "invalid_request_error",
            (Dialect::Anthropic, _) => "api_error",
        }
    }

    /// The error object alone, for an error that happens after a stream
    /// has started and can only be sent as an event.
    pub fn body(&self) -> serde_json::Value {
        match self.dialect {
            Dialect::OpenAi => json!({"error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }}),
            Dialect::Anthropic => json!({"type": "error", "error": {
                "type": self.kind(),
                "message": self.message,
            }}),
        }
    }
}

impl From<smoe::Error> for ApiError {
    fn from(e: smoe::Error) -> Self {
        match e {
            // Bad input the request carried: a template that raised on
            // these messages, ids or options that make no sense.
            smoe::Error::Invalid(_) | smoe::Error::Template(_) => ApiError::invalid(e.to_string()),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}
