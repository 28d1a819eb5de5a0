//! `smoe serve`: an OpenAI- and Anthropic-compatible HTTP server in front of
//! one engine.
//!
//! Requests are parsed and checked here, rendered with the chat template and
//! tokenized on tokio's blocking pool, then wait in a bounded queue for the
//! single engine thread ([`worker`]). Text streams back as the engine makes
//! it, and [`reply`] turns it into reasoning, content and tool calls in each
//! API's shape ([`openai`], [`anthropic`]).

mod anthropic;
mod error;
mod metrics;
mod openai;
mod reply;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use smoe::engine::Engine;
use smoe::sampler::SamplingParams;

use crate::error::{ApiError, Dialect};
use crate::reply::ReplyParser;
use crate::worker::{Event, Job, Queue, Refused};

/// Largest request body accepted; a conversation that fits any context
/// this engine plans for is far smaller.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// How long open replies may go on after Ctrl-C or SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Open connections at most. Each costs a file descriptor; beyond this a
/// new connection is closed at once, so that half-sent requests cannot use
/// up the process's descriptors (1,024 by default) and starve the rest
/// until the read timeout frees them.
pub const MAX_CONNECTIONS: usize = 512;

/// The page served at `/`.
const WEB_PAGE: &str = include_str!("web/index.html");

#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    /// Name under which `/v1/models` lists the model.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Context limit for a request: prompt plus reply.
    pub ctx: usize,
    /// Requests that may wait while others run.
    pub queue: usize,
    /// Requests decoding at once, batched ([`smoe::batch`]).
    pub parallel: usize,
    /// Sleep after each token, so tests can have a reply still streaming
    /// when a client disconnects, on any machine.
    pub token_delay: Duration,
    /// How long a client may take to send a request's headers, and then
    /// its body; a connection that has not sent them by then is closed
    /// (headers) or answered 408 (body).
    pub read_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Load(String),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

struct App {
    config: Config,
    engine: Arc<OnceLock<Arc<Engine>>>,
    queue: Queue,
    metrics: metrics::Metrics,
    started: Instant,
}

type AppState = State<Arc<App>>;

/// Binds, starts loading the model with `load` on the engine thread, and
/// serves until Ctrl-C or SIGTERM (or until loading fails, with its error).
/// `on_listening` sees the bound address (the port may have been 0).
pub fn serve(
    config: Config,
    load: Box<dyn FnOnce() -> Result<Engine, String> + Send>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: config.addr,
                source,
            })?;
        let engine = Arc::new(OnceLock::new());
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let queue = worker::start(
            config.queue,
            config.parallel,
            config.token_delay,
            Arc::clone(&engine),
            load,
            loaded_tx,
        )?;
        on_listening(listener.local_addr()?);
        let metrics = metrics::Metrics::new(
            Arc::clone(&queue.counters),
            queue.capacity(),
            Arc::clone(&engine),
        );
        let app = Arc::new(App {
            config,
            engine,
            queue,
            metrics,
            started: Instant::now(),
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Error>();
        tokio::spawn(async move {
            if let Ok(Err(msg)) = loaded_rx.await {
                let _ = stop_tx.send(Error::Load(msg));
            }
        });
        let failure = Arc::new(std::sync::Mutex::new(None));
        let failed = Arc::clone(&failure);
        let stopping = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::clone(&stopping);
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated() => {}
                // A load that went well drops the sender: no reason to stop.
                Ok(e) = stop_rx => *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
            }
            stop.notify_one();
        };
        let read_timeout = app.config.read_timeout;
        let server = serve_connections(listener, router(app), read_timeout, shutdown);
        // Open streams get a few seconds to finish, not as long as a
        // reply of the whole context would take.
        tokio::select! {
            served = server => served?,
            _ = async {
                stopping.notified().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {}
        }
        let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        failure.map_or(Ok(()), Err)
    })
}

/// SIGTERM, which `docker stop` and Kubernetes send before SIGKILL: the
/// same graceful stop as Ctrl-C, so open replies get their few seconds.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Accepts connections until `shutdown`, then lets open ones finish.
/// axum's own loop sets no timer, so hyper's header read timeout never
/// fires and a half-sent request held its connection forever; here each
/// connection gets `read_timeout` for its headers, and at most
/// [`MAX_CONNECTIONS`] are open at once.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: Router,
    read_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or a connection reset before it was
                // accepted: both pass, so wait a little and go on.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Refuses a declared body over [`MAX_BODY_BYTES`] before reading any of
/// it, and reads the rest within the read timeout: a client that sends
/// headers and then trickles (or never sends) its body gets 408 instead
/// of holding the connection open.
async fn read_body(State(app): AppState, req: Request, next: Next) -> Response {
    let dialect = dialect_of(req.uri().path());
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > MAX_BODY_BYTES as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is {n} bytes (Content-Length), the limit is {MAX_BODY_BYTES}"
            ),
        )
        .dialect(dialect)
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let limit = app.config.read_timeout;
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over the limit of {MAX_BODY_BYTES} bytes, or was cut off"),
        )
        .dialect(dialect)
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
        )
        .dialect(dialect)
        .into_response(),
    }
}

fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&app), auth));
    Router::new()
        .route("/", get(|| async { Html(WEB_PAGE) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics::scrape))
        .merge(api)
        .fallback(|uri: Uri| async move {
            ApiError::new(StatusCode::NOT_FOUND, "no such route; see GET /v1/models")
                .dialect(dialect_of(uri.path()))
        })
        .method_not_allowed_fallback(|uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
            .dialect(dialect_of(uri.path()))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), read_body))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            metrics::track,
        ))
        .with_state(app)
}

fn dialect_of(path: &str) -> Dialect {
    if path.starts_with("/v1/messages") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

/// `--api-key`: `Authorization: Bearer KEY` or `x-api-key: KEY` (what the
/// OpenAI and Anthropic clients send) on every API route.
async fn auth(State(app): AppState, req: Request, next: Next) -> Response {
    let Some(key) = &app.config.api_key else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, x_api_key]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given.trim().as_bytes(), key.as_bytes()));
    if ok {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)",
    )
    .dialect(dialect_of(req.uri().path()))
    .into_response()
}

/// Compares without stopping at the first difference, so response time
/// does not tell how much of a guessed key was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(app): AppState) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.config.model_name,
            "object": "model",
            "created": unix_time(),
            "owned_by": "smoe",
            "max_model_len": app.ctx_limit(),
        }],
    }))
}

/// Readiness (200 once the model is loaded, 503 before) and the counters.
async fn health(State(app): AppState) -> Response {
    let c = &app.queue.counters;
    let engine = app.engine.get();
    let cache = engine.and_then(|e| e.cache_report(None));
    let stopped = c.engine_stopped.load(Ordering::SeqCst);
    // A vault file cut short or overwritten under the server fails the
    // requests that need it: not ready until it is restored.
    let files = engine.map(|e| e.check_files().map_err(|e| e.to_string()));
    let body = json!({
        "status": match (stopped, &files) {
            (true, _) => "stopped",
            (false, Some(Ok(()))) => "ok",
            (false, Some(Err(_))) => "error",
            (false, None) => "loading",
        },
        "error": files.as_ref().and_then(|f| f.as_ref().err()),
        "model": app.config.model_name,
        "ctx": app.ctx_limit(),
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "queue": {
            "waiting": c.waiting.load(Ordering::SeqCst),
            "capacity": app.queue.capacity(),
            "in_flight": c.in_flight.load(Ordering::SeqCst),
        },
        "generations": {
            "completed": c.completed.load(Ordering::SeqCst),
            "cancelled": c.cancelled.load(Ordering::SeqCst),
            "failed": c.failed.load(Ordering::SeqCst),
            "rejected": c.rejected.load(Ordering::SeqCst),
            "panicked": c.panicked.load(Ordering::SeqCst),
        },
        "tokens": {
            "prompt": c.prompt_tokens.load(Ordering::Relaxed),
            "cached": c.cached_tokens.load(Ordering::Relaxed),
            "generated": c.generated_tokens.load(Ordering::Relaxed),
            "last_decode_tok_s": f64::from_bits(c.last_decode_tok_s.load(Ordering::Relaxed)),
        },
        "cache": cache,
    });
    let status = if files.is_some_and(|f| f.is_ok()) && !stopped {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

impl App {
    fn ctx_limit(&self) -> usize {
        match self.engine.get() {
            Some(e) => self.config.ctx.min(e.config().max_position_embeddings),
            None => self.config.ctx,
        }
    }

    /// Renders and tokenizes a request, checks it against the context and
    /// queues it. Errors come back before any response is sent, so a
    /// streaming request that cannot run still gets a plain 4xx.
    async fn start(&self, req: Generate, dialect: Dialect) -> Result<Started, ApiError> {
        let clock = self.metrics.clock();
        let engine = self.engine.get().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is still loading",
            )
            .retry_after(5)
            .dialect(dialect)
        })?;
        let Generate {
            prompt,
            params,
            max_tokens,
            stop,
        } = req;
        let limit = self.ctx_limit();
        let (ids, in_reasoning) = tokio::task::spawn_blocking(move || prompt.ids(&engine, limit))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| e.dialect(dialect))?;
        let too_long = |msg: String| {
            ApiError::invalid(msg)
                .code("context_length_exceeded")
                .dialect(dialect)
        };
        let Some(ids) = ids else {
            return Err(too_long(format!(
                "the prompt is more than {limit} tokens, and the context is {limit} tokens (--ctx)"
            )));
        };
        let room = limit.saturating_sub(ids.len());
        if room == 0 {
            return Err(too_long(format!(
                "the prompt is {} tokens, and the context is {limit} tokens (--ctx)",
                ids.len()
            )));
        }
        let max_tokens = match max_tokens {
            Some(n) if n > room => {
                return Err(too_long(format!(
                    "max_tokens is {n}, but the prompt is {} tokens and the context {limit}, which leaves {room}",
                    ids.len()
                ))
                .param("max_tokens"))
            }
            Some(n) => n,
            None => room,
        };
        let (tx, events) = mpsc::unbounded_channel();
        let prompt_tokens = ids.len();
        let job = Job {
            prompt: ids,
            params,
            max_tokens,
            stop,
            events: tx,
            clock,
        };
        match self.queue.submit(job) {
            Ok(()) => Ok(Started {
                events,
                in_reasoning,
                prompt_tokens,
            }),
            Err(Refused::Full) => Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} requests are already waiting; try again later",
                    self.queue.capacity()
                ),
            )
            .retry_after(1)
            .dialect(dialect)),
            Err(Refused::Stopped) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped",
            )
            .dialect(dialect)),
        }
    }
}

/// What a request asks the engine for, in neither API's terms.
pub(crate) struct Generate {
    pub prompt: PromptInput,
    pub params: SamplingParams,
    /// None: as many as the context leaves room for.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
}

pub(crate) enum PromptInput {
    /// Messages in OpenAI's shape, tool schemas and extra template
    /// variables, for the chat template.
    Chat {
        messages: Value,
        tools: Option<Value>,
        kwargs: Map<String, Value>,
    },
    Raw(String),
}

impl PromptInput {
    /// The prompt's ids (None when they would be more than `limit`), and
    /// whether it leaves the reply inside `<think>`.
    fn ids(&self, engine: &Engine, limit: usize) -> Result<(Option<Vec<u32>>, bool), ApiError> {
        match self {
            PromptInput::Chat {
                messages,
                tools,
                kwargs,
            } => {
                let text = engine.render_chat(messages, tools.as_ref(), kwargs)?;
                let ids = engine.tokenizer()?.encode_at_most(&text, false, limit)?;
                Ok((ids, ReplyParser::prompt_opens_reasoning(&text)))
            }
            PromptInput::Raw(text) => Ok((
                engine.tokenizer()?.encode_at_most(text, true, limit)?,
                false,
            )),
        }
    }
}

pub(crate) struct Started {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub in_reasoning: bool,
    pub prompt_tokens: usize,
}

/// A request's body, or why it could not be read (too large, cut short).
pub(crate) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    dialect: Dialect,
) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError::new(r.status(), r.body_text()).dialect(dialect))
}

/// Parses a request body, naming what is wrong with it: not JSON, a
/// missing field or one of the wrong type.
pub(crate) fn parse_json<T: DeserializeOwned>(
    bytes: &[u8],
    dialect: Dialect,
) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")).dialect(dialect))
}

/// A generating route's body as the engine takes it, and how to answer.
pub(crate) struct Parsed {
    pub gen: Generate,
    pub stream: bool,
    pub include_usage: bool,
}

/// What a request body on a generating route comes to before the engine
/// sees it: the chat messages (as the template takes them), tools and
/// template variables, or the raw prompt, each as JSON; or the 4xx message
/// the route answers with. The request-body fuzz target drives the routes'
/// own parsing through this.
#[doc(hidden)]
pub fn parse_request(path: &str, body: &[u8]) -> Result<Value, String> {
    let parsed = match path {
        "/v1/chat/completions" => openai::chat_request(body),
        "/v1/completions" => openai::completion_request(body),
        "/v1/messages" => anthropic::messages_request(body),
        _ => return Err(format!("{path} takes no request body")),
    }
    .map_err(|e| e.message)?;
    Ok(match parsed.gen.prompt {
        PromptInput::Chat {
            messages,
            tools,
            kwargs,
        } => json!({"messages": messages, "tools": tools, "kwargs": kwargs}),
        PromptInput::Raw(prompt) => json!({ "prompt": prompt }),
    })
}

pub(crate) fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id unique within this process, e.g. `chatcmpl-1a2b-7`.
pub(crate) fn new_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n:04x}", unix_time())
}

/// A seed for a request that gave none: sampled replies should differ.
pub(crate) fn fresh_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    nanos
        ^ NEXT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
