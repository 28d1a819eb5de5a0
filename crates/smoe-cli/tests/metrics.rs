//! `GET /metrics`: scraped after a known set of requests and parsed as
//! Prometheus' text format by a parser nobody here wrote; every count
//! must be what was sent.

mod common;

use common::server::{Reply, Server};
use common::*;
use prometheus_parse::{Sample, Scrape, Value as PValue};
use serde_json::{json, Value};

fn scrape(server: &Server) -> Scrape {
    let r = server.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    Scrape::parse(r.text().lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The one sample named `name` whose labels include `labels`.
fn sample<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0]
}

fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(s, name, labels).value {
        PValue::Counter(v) | PValue::Gauge(v) | PValue::Untyped(v) => v,
        ref other => panic!("{name} is not a number: {other:?}"),
    }
}

/// A histogram's observation count, checked against its buckets: they
/// are cumulative and the last (+Inf) holds every observation.
fn histogram_count(s: &Scrape, name: &str) -> f64 {
    let PValue::Histogram(buckets) = &sample(s, name, &[]).value else {
        panic!("{name} is not a histogram");
    };
    let count = value(s, &format!("{name}_count"), &[]);
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "{buckets:?}"
    );
    let last = buckets.last().unwrap();
    assert!(
        last.less_than.is_infinite() && last.count == count,
        "{buckets:?}"
    );
    count
}

fn requests(s: &Scrape, route: &str, status: &str) -> f64 {
    value(
        s,
        "smoe_http_requests_total",
        &[("route", route), ("status", status)],
    )
}

fn usage(r: &Reply) -> (u64, u64) {
    assert_eq!(r.status, 200, "{}", r.text());
    let u = &r.json()["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

#[test]
fn metrics_count_what_was_sent() {
    let server = Server::start(&[]);
    let chat = |text: &str, max_tokens: u64| json!({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0});
    let mut sent = vec![
        usage(&server.post("/v1/chat/completions", &chat("Tell me a story", 5))),
        usage(&server.post("/v1/chat/completions", &chat("Tell me a story", 7))),
        usage(&server.post("/v1/chat/completions", &chat("Something else", 3))),
        usage(&server.post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
        )),
    ];
    let mut streamed = chat("Hello there", 6);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = server.post("/v1/chat/completions", &streamed);
    assert_eq!(r.status, 200, "{}", r.text());
    let last: Value = r
        .sse_data()
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .next_back()
        .unwrap();
    sent.push((
        last["usage"]["prompt_tokens"].as_u64().unwrap(),
        last["usage"]["completion_tokens"].as_u64().unwrap(),
    ));
    let bad = common::server::request(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        b"{not json",
    );
    assert_eq!(bad.status, 400);
    assert_eq!(server.get("/no/such/route").status, 404);
    assert_eq!(server.get("/v1/models").status, 200);
    assert_eq!(server.get("/v1/models").status, 200);
    server.idle_health();

    let first = scrape(&server);
    let s = scrape(&server);
    let generations = sent.len() as f64;
    let prompt: u64 = sent.iter().map(|u| u.0).sum();
    let generated: u64 = sent.iter().map(|u| u.1).sum();

    assert_eq!(requests(&s, "/v1/chat/completions", "200"), 4.0);
    assert_eq!(requests(&s, "/v1/chat/completions", "400"), 1.0);
    assert_eq!(requests(&s, "/v1/completions", "200"), 1.0);
    assert_eq!(requests(&s, "/v1/models", "200"), 2.0);
    assert_eq!(requests(&s, "unmatched", "404"), 1.0);
    // A scrape is counted once it has been answered: the first saw none.
    assert_eq!(requests(&s, "/metrics", "200"), 1.0);
    assert!(first
        .samples
        .iter()
        .all(|x| x.labels.get("route") != Some("/metrics")));

    assert_eq!(value(&s, "smoe_prompt_tokens_total", &[]), prompt as f64);
    assert_eq!(
        value(&s, "smoe_generated_tokens_total", &[]),
        generated as f64
    );
    assert_eq!(
        value(&s, "smoe_generations_total", &[("outcome", "completed")]),
        generations
    );
    for outcome in ["cancelled", "failed", "rejected", "panicked"] {
        assert_eq!(
            value(&s, "smoe_generations_total", &[("outcome", outcome)]),
            0.0
        );
    }
    // Every generation made a first token; every later one was a gap.
    assert_eq!(
        histogram_count(&s, "smoe_time_to_first_token_seconds"),
        generations
    );
    assert_eq!(
        histogram_count(&s, "smoe_inter_token_latency_seconds"),
        generated as f64 - generations
    );
    assert_eq!(value(&s, "smoe_queue_depth", &[]), 0.0);
    assert_eq!(value(&s, "smoe_active_sequences", &[]), 0.0);
    assert_eq!(value(&s, "smoe_queue_capacity", &[]), 64.0);
    assert_eq!(value(&s, "smoe_model_loaded", &[]), 1.0);
    // A checkpoint is resident whole: no expert is streamed.
    assert!(s
        .samples
        .iter()
        .all(|x| !x.metric.starts_with("smoe_expert")));

    // Prometheus itself asks for OpenMetrics, and gets it.
    let om = common::server::request(
        &server.addr,
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
        b"",
    );
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.text().ends_with("# EOF\n"), "{}", om.text());
    assert!(om
        .text()
        .contains(&format!("smoe_generated_tokens_total {generated}\n")));
}

#[test]
fn metrics_count_expert_reads_by_tier() {
    let dir = tempfile::tempdir().unwrap();
    let vault = dir.path().join("vault");
    smoe_ok(&[
        "convert",
        path_str(&fixture(common::server::SERVE_MODEL)),
        "-o",
        path_str(&vault),
        "--quiet",
    ]);
    let server = Server::start_with(&vault, &["--ram-budget", "1MiB", "--prefetch", "on"]);
    let r = server.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let cache = server.idle_health()["cache"].clone();
    let s = scrape(&server);
    let lookups = |tier| value(&s, "smoe_expert_lookups_total", &[("tier", tier)]);
    let read = |kind| value(&s, "smoe_expert_read_bytes_total", &[("kind", kind)]);
    assert_eq!(lookups("ram"), cache["hits"].as_f64().unwrap());
    assert_eq!(
        lookups("readahead"),
        cache["prefetch_hits"].as_f64().unwrap()
    );
    assert_eq!(lookups("ssd"), cache["misses"].as_f64().unwrap());
    assert_eq!(read("demand"), cache["demand_bytes"].as_f64().unwrap());
    assert_eq!(read("readahead"), cache["prefetch_bytes"].as_f64().unwrap());
    // A cache this small misses, so the vault was read.
    assert!(lookups("ssd") > 0.0 && read("demand") > 0.0, "{cache}");
    // Demand bytes per second the compute thread was blocked on them: a
    // loaded machine may deschedule it until its few 4 KiB reads are done,
    // and then it never blocked and there is no rate to give.
    let rate = value(&s, "smoe_expert_read_gigabytes_per_second", &[]);
    if value(&s, "smoe_expert_read_blocked_seconds_total", &[]) > 0.0 {
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
    } else {
        assert_eq!(rate, 0.0);
    }
    assert_eq!(
        value(&s, "smoe_expert_cache_slots", &[]),
        cache["cache_slots"].as_f64().unwrap()
    );
}
