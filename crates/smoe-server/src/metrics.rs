//! `GET /metrics`: the server's counters in Prometheus' exposition format,
//! through `prometheus-client` (the Prometheus project's own Rust client:
//! typed metrics in a registry this server owns, no process-wide recorder,
//! and both the classic 0.0.4 text format and OpenMetrics).
//!
//! Most figures already exist as atomics that `/health` reads (the queue's
//! [`Counters`], the expert cache's stats); a [`Collector`] reads those at
//! scrape time rather than counting everything twice. Only what nothing
//! else counts is instrumented here: requests by route and status, and the
//! per-token latencies ([`TokenClock`]).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;
use smoe::engine::Engine;

use crate::worker::Counters;
use crate::AppState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route's pattern, or `unmatched`: never the raw path, so that a
    /// scanner's random URLs cannot grow the series without bound.
    route: String,
    status: u16,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ttft: Histogram,
    itl: Histogram,
}

impl Metrics {
    pub fn new(
        counters: Arc<Counters>,
        queue_capacity: usize,
        engine: Arc<OnceLock<Arc<Engine>>>,
    ) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "smoe_http_requests",
            "HTTP requests answered, by route pattern and status code",
            requests.clone(),
        );
        // From 5 ms (a cached prompt on a fast machine) to 41 s (a long
        // prompt streamed from SSD behind a queue).
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "smoe_time_to_first_token_seconds",
            "From a generation request's arrival (before tokenizing) to its first token",
            ttft.clone(),
        );
        // From 1 ms (resident decode) to 8 s (every expert missed).
        let itl = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "smoe_inter_token_latency_seconds",
            "Between consecutive tokens of one generation",
            itl.clone(),
        );
        registry.register_collector(Box::new(Live {
            counters,
            queue_capacity,
            engine,
        }));
        Metrics {
            registry,
            requests,
            ttft,
            itl,
        }
    }

    /// A clock for one generation, started now.
    pub fn clock(&self) -> TokenClock {
        TokenClock {
            ttft: self.ttft.clone(),
            itl: self.itl.clone(),
            started: Instant::now(),
            last: None,
        }
    }

    /// The exposition in the format `accept` prefers: OpenMetrics when the
    /// scraper asks for it (Prometheus does), else the 0.0.4 text format
    /// that every other scraper reads.
    fn render(&self, accept: Option<&str>) -> Result<(&'static str, String), fmt::Error> {
        let mut body = String::new();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
            Ok((
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ))
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut body, &self.registry)?;
            Ok((
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body,
            ))
        }
    }
}

/// One generation's token times: the first token observes the time to
/// first token, each later one the gap since the previous.
#[derive(Debug)]
pub struct TokenClock {
    ttft: Histogram,
    itl: Histogram,
    started: Instant,
    last: Option<Instant>,
}

impl TokenClock {
    /// Call as each token is chosen.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.ttft.observe((now - self.started).as_secs_f64()),
            Some(prev) => self.itl.observe((now - prev).as_secs_f64()),
        }
        self.last = Some(now);
    }
}

/// `GET /metrics`.
pub async fn scrape(State(app): AppState, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match app.metrics.render(accept) {
        Ok((content_type, body)) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response(),
        Err(_) => crate::error::ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode the metrics",
        )
        .into_response(),
    }
}

/// Counts every response by route and status; a layer over the whole
/// router, so that rejections by other layers (401, 408, 413) count too.
pub async fn track(State(app): AppState, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// What is already counted elsewhere, read at each scrape.
struct Live {
    counters: Arc<Counters>,
    queue_capacity: usize,
    engine: Arc<OnceLock<Arc<Engine>>>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

impl Collector for Live {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let loaded = self.engine.get().is_some() && !c.engine_stopped.load(Ordering::SeqCst);
        one(
            &mut enc,
            "smoe_model_loaded",
            "1 once the model is loaded and the engine runs, else 0",
            ConstGauge::new(i64::from(loaded)),
        )?;
        one(
            &mut enc,
            "smoe_queue_depth",
            "Requests waiting for the engine",
            ConstGauge::new(c.waiting.load(Ordering::SeqCst) as i64),
        )?;
        one(
            &mut enc,
            "smoe_queue_capacity",
            "Requests that may wait (--queue); more get 429",
            ConstGauge::new(self.queue_capacity as i64),
        )?;
        one(
            &mut enc,
            "smoe_active_sequences",
            "Generations the engine is running",
            ConstGauge::new(c.in_flight.load(Ordering::SeqCst) as i64),
        )?;
        labelled(
            &mut enc,
            "smoe_generations",
            "Generations by how they ended: completed, cancelled (client gone), failed, rejected (queue full), panicked",
            "outcome",
            [
                ("completed", get(&c.completed)),
                ("cancelled", get(&c.cancelled)),
                ("failed", get(&c.failed)),
                ("rejected", get(&c.rejected)),
                ("panicked", get(&c.panicked)),
            ],
        )?;
        one(
            &mut enc,
            "smoe_prompt_tokens",
            "Prompt tokens of generations that ran (tokens in)",
            ConstCounter::new(get(&c.prompt_tokens)),
        )?;
        one(
            &mut enc,
            "smoe_cached_prompt_tokens",
            "Prompt tokens whose KV was kept from the previous request, not prefilled again",
            ConstCounter::new(get(&c.cached_tokens)),
        )?;
        one(
            &mut enc,
            "smoe_generated_tokens",
            "Tokens generated (tokens out)",
            ConstCounter::new(get(&c.generated_tokens)),
        )?;
        let Some(cache) = self.engine.get().and_then(|e| e.cache_report(None)) else {
            // A checkpoint, or still loading: no experts are streamed.
            return Ok(());
        };
        let help = "Routed experts a layer asked for, by the tier that served them: vram (on a GPU, a layer whose experts are in VRAM), ram (already cached), readahead (brought in by a prediction), ssd (read while compute waited)";
        let tiers = [
            ("ram", cache.hits),
            ("readahead", cache.prefetch_hits),
            ("ssd", cache.misses),
        ];
        match cache.gpu {
            Some(g) => {
                let [ram, readahead, ssd] = tiers;
                labelled(
                    &mut enc,
                    "smoe_expert_lookups",
                    help,
                    "tier",
                    [("vram", g.vram_hits), ram, readahead, ssd],
                )?;
                labelled(
                    &mut enc,
                    "smoe_gpu_experts",
                    "Experts not in VRAM by where they ran: copied to the GPU from their RAM slots, or run on the CPU there",
                    "way",
                    [("copied", g.copied), ("cpu", g.cpu_runs)],
                )?;
                one(
                    &mut enc,
                    "smoe_gpu_pcie_bytes",
                    "Bytes of experts copied from RAM to the GPU",
                    ConstCounter::new(g.pcie_bytes),
                )?;
            }
            None => labelled(&mut enc, "smoe_expert_lookups", help, "tier", tiers)?,
        }
        labelled(
            &mut enc,
            "smoe_expert_read_bytes",
            "Bytes of expert records read from the vault: on demand, or ahead by prediction",
            "kind",
            [
                ("demand", cache.demand_bytes),
                ("readahead", cache.prefetch_bytes),
            ],
        )?;
        one(
            &mut enc,
            "smoe_expert_read_gigabytes_per_second",
            "Demand bytes of expert records per second the compute thread was blocked on them, since start (0 before it has waited)",
            ConstGauge::new(cache.read_gb_s),
        )?;
        one(
            &mut enc,
            "smoe_expert_read_blocked_seconds",
            "Time the compute thread waited for expert reads",
            ConstCounter::new(cache.blocked_s),
        )?;
        one(
            &mut enc,
            "smoe_expert_cache_slots",
            "Expert records the RAM cache holds",
            ConstGauge::new(cache.cache_slots as i64),
        )?;
        one(
            &mut enc,
            "smoe_expert_cache_bytes",
            "RAM of the expert cache",
            ConstGauge::new(cache.cache_bytes as i64),
        )
    }
}

fn one<M: EncodeMetric + TypedMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> fmt::Result {
    metric.encode(enc.encode_descriptor(name, help, None, M::TYPE)?)
}

fn labelled<const N: usize>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: [(&'static str, u64); N],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
    for (value, n) in values {
        let labels = [(label, value)];
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
