//! Configuration: `worker.toml` plus `WORKER_*` environment overrides.
//!
//! Keys are named as in the Go worker's `config.yaml`, so migrating is a copy. Every problem is
//! reported as one line naming the key, because the operator reads it in a terminal or a
//! container log, not in a stack trace.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::cidr::Cidr;
use crate::duration;

/// The secret shared with Wavelog's PHP backend. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn expose_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The sample secret of the repository's `worker.toml`; the worker warns when it runs with it.
pub const SAMPLE_SECRET: &str = "SAMPLE-ONLY-change-me-0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone)]
pub struct Config {
    /// Public listener (WebSocket, SSE). Empty bind = all interfaces, IPv4 and IPv6.
    pub ws_bind: String,
    pub ws_port: u16,
    /// Internal listener (`/internal/*`), loopback by default because it holds the keys.
    pub internal_bind: String,
    pub internal_port: u16,
    pub worker_secret: Secret,
    /// A topic expires this long after its last registration.
    pub topic_ttl: Duration,
    /// Close sockets whose token expires (the Go worker only checks at connect).
    pub enforce_token_expiry: bool,
    /// Time a client has to send its HTTP request head.
    pub header_timeout: Duration,
    /// Time a new WebSocket has to send its auth frame.
    pub auth_timeout: Duration,
    pub ping_interval: Duration,
    /// A socket that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// Window over which sockets are closed on shutdown, so browsers don't reconnect at once.
    pub shutdown_drain: Duration,
    /// Events queued per subscriber before it is considered lagging and told to resync.
    pub subscriber_queue: usize,
    /// Cluster mode: the Redis URL (`redis://[user:pass@]host:port/db`).
    pub redis_url: Option<String>,
    /// How long a node trusts its cached view of a topic's registration (cluster mode).
    pub registry_cache_ttl: Duration,
    /// Largest body accepted by the internal API.
    pub max_payload_bytes: usize,
    /// Browser origins allowed on `/ws` and `/sse`; empty = any.
    pub allowed_origins: Vec<String>,
    /// Comment line interval on idle SSE streams (below proxies' read timeouts).
    pub sse_keepalive: Duration,
    /// Reconnect delay suggested to EventSource (`retry:`).
    pub sse_retry: Duration,
    /// Events kept per topic for resume (0 = off).
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Memory for history across all topics.
    pub max_history_bytes: usize,
    /// Topics one connection may subscribe to.
    pub max_topics_per_connection: usize,
    /// Open WebSocket + SSE connections; more are refused with 503.
    pub max_connections: usize,
    /// Open connections per client IP; more are refused with 429.
    pub max_connections_per_ip: usize,
    /// Registered topics; registering more is refused with 503.
    pub max_topics: usize,
    /// Failed authentications a client IP may make at once, then `auth_failures_per_minute`;
    /// beyond that its connection attempts get 429.
    pub auth_failure_burst: u32,
    pub auth_failures_per_minute: u32,
    /// Probes of unregistered topics a client may make at once, then `topic_probes_per_minute`
    /// (enumerating `qso.<id>` takes thousands; a club's stale tabs make dozens).
    pub topic_probe_burst: u32,
    pub topic_probes_per_minute: u32,
    /// Inbound frames a WebSocket may send at once, then `inbound_frames_per_second`; a socket
    /// that floods is closed.
    pub inbound_frame_burst: u32,
    pub inbound_frames_per_second: u32,
    /// Peers whose `X-Real-IP` / `X-Forwarded-For` name the client (addresses or CIDRs).
    pub trusted_proxies: Vec<Cidr>,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// The DX cluster relay; `None` unless `dxcluster.host` is set.
    pub dxcluster: Option<DxClusterConfig>,
}

/// The `[dxcluster]` table: one telnet connection to a DX cluster node, relayed as pushes.
#[derive(Debug, Clone)]
pub struct DxClusterConfig {
    pub host: String,
    pub port: u16,
    /// Our login at the node.
    pub callsign: String,
    /// Sent when the node asks for one; empty = none.
    pub password: Secret,
    /// The topic the relay registers and publishes to (Wavelog looks for `dxspots`).
    pub topic: String,
    /// Wavelog's callsign lookup API (`http://.../index.php/api/lookup`); `None` = no DXCC data.
    pub lookup_url: Option<String>,
    pub lookup_key: Secret,
    /// The topic is unregistered once the node has been unreachable this long, so Wavelog
    /// falls back to polling.
    pub unregister_after: Duration,
    /// No line from the node for this long: it is taken for dead and reconnected.
    pub silence_timeout: Duration,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every key the config file may contain.
const KEYS: &[&str] = &[
    "ws_bind",
    "ws_port",
    "internal_bind",
    "internal_port",
    "worker_secret",
    "redis_url",
    "topic_ttl",
    "enforce_token_expiry",
    "auth_timeout",
    "header_timeout",
    "ping_interval",
    "idle_timeout",
    "shutdown_drain",
    "subscriber_queue",
    "max_payload_bytes",
    "allowed_origins",
    "sse_keepalive",
    "sse_retry",
    "history_size",
    "history_ttl",
    "max_history_bytes",
    "max_topics_per_connection",
    "max_connections",
    "max_connections_per_ip",
    "max_topics",
    "log_format",
    "registry_cache_ttl",
    "auth_failure_burst",
    "auth_failures_per_minute",
    "topic_probe_burst",
    "topic_probes_per_minute",
    "inbound_frame_burst",
    "inbound_frames_per_second",
    "trusted_proxies",
    "dxcluster",
];

/// Keys of the `[dxcluster]` table.
const DXCLUSTER_KEYS: &[&str] = &[
    "host",
    "port",
    "callsign",
    "password",
    "topic",
    "lookup_url",
    "lookup_key",
    "unregister_after",
    "silence_timeout",
];

/// One line naming the key and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Name of the environment variable that overrides `key` (`dxcluster.host` ->
/// `WORKER_DXCLUSTER_HOST`).
pub fn env_name(key: &str) -> String {
    if key == "worker_secret" {
        "WORKER_SECRET".to_string()
    } else {
        format!("WORKER_{}", key.replace('.', "_").to_ascii_uppercase())
    }
}

/// Where a key's value came from, so the error can point there.
enum Value<'a> {
    Env(String, String),
    File(&'a toml::Value),
}

struct Source<'a> {
    table: toml::Table,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Source<'_> {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        let var = env_name(key);
        match (self.env)(&var) {
            Some(v) => Some(Value::Env(var, v)),
            None => match key.split_once('.') {
                Some((table, sub)) => self
                    .table
                    .get(table)
                    .and_then(|t| t.as_table())
                    .and_then(|t| t.get(sub))
                    .map(Value::File),
                None => self.table.get(key).map(Value::File),
            },
        }
    }

    fn problem(&self, key: &str, value: &Value<'_>, expected: &str) -> ConfigError {
        match value {
            Value::Env(var, v) => ConfigError(format!(
                "key \"{key}\" (from {var}): expected {expected}, got {v:?}"
            )),
            Value::File(v) => ConfigError(format!(
                "key \"{key}\": expected {expected}, got {}",
                show(v)
            )),
        }
    }

    fn string(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::Env(_, v)) => Ok(v),
            Some(v @ Value::File(raw)) => raw
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.problem(key, &v, "a string")),
        }
    }

    fn integer(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
        let expected = format!("an integer from {min} to {max}");
        let value = match self.get(key) {
            None => return Ok(default),
            Some(v) => v,
        };
        let n = match &value {
            Value::Env(_, s) => s.trim().parse::<i64>().ok(),
            Value::File(raw) => raw.as_integer(),
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.problem(key, &value, &expected)),
        }
    }

    fn boolean(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let value = match self.get(key) {
            None => return Ok(default),
            Some(v) => v,
        };
        let b = match &value {
            Value::Env(_, s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            },
            Value::File(raw) => raw.as_bool(),
        };
        b.ok_or_else(|| self.problem(key, &value, "true or false"))
    }

    /// A Go-style duration string ("24h", "90m", "500ms") or an integer number of seconds.
    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let value = match self.get(key) {
            None => return Ok(default),
            Some(v) => v,
        };
        let parsed = match &value {
            Value::Env(_, s) => duration::parse(s),
            Value::File(toml::Value::String(s)) => duration::parse(s),
            Value::File(toml::Value::Integer(n)) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
            Value::File(_) => Err(String::new()),
        };
        parsed.map_err(|_| {
            self.problem(
                key,
                &value,
                "a duration such as \"24h\", \"90m\" or \"30s\"",
            )
        })
    }

    /// A list of strings; from the environment, comma-separated.
    fn list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let value = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(v) => v,
        };
        let items: Option<Vec<String>> = match &value {
            Value::Env(_, s) => Some(s.split(',').map(str::to_string).collect()),
            Value::File(toml::Value::Array(a)) => {
                a.iter().map(|v| v.as_str().map(str::to_string)).collect()
            }
            Value::File(_) => None,
        };
        let items = items.ok_or_else(|| self.problem(key, &value, "a list of strings"))?;
        Ok(items
            .into_iter()
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// A list of addresses or CIDRs; `default` when the key is absent.
    fn cidrs(&self, key: &str, default: &[&str]) -> Result<Vec<Cidr>, ConfigError> {
        let items = match self.get(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(_) => self.list(key)?,
        };
        items
            .iter()
            .map(|item| {
                Cidr::parse(item).ok_or_else(|| {
                    ConfigError(format!(
                        "key \"{key}\": {item:?} is not an address or CIDR (e.g. \"10.0.0.0/8\")"
                    ))
                })
            })
            .collect()
    }

    fn positive_duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let d = self.duration(key, default)?;
        if d.is_zero() {
            return Err(ConfigError(format!("key \"{key}\": must be positive")));
        }
        Ok(d)
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Redis URL with its password replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A short rendering of a TOML value for error lines.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => format!("a {}", other.type_str()),
    }
}

impl Config {
    /// Reads `path` and applies environment overrides. A missing file is only an error when the
    /// environment does not provide the secret either (containers often configure by env alone).
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && env("WORKER_SECRET").is_some() =>
            {
                String::new()
            }
            Err(e) => return Err(ConfigError(format!("cannot read {}: {e}", path.display()))),
        };
        Self::from_toml(&text, env)
    }

    /// Parses TOML text and applies environment overrides.
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let first_line = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string();
            ConfigError(format!("invalid TOML: {first_line}"))
        })?;
        if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(ConfigError(format!(
                "unknown key \"{unknown}\" (known keys: {})",
                KEYS.join(", ")
            )));
        }
        let src = Source { table, env };

        let secret = src.string("worker_secret", "")?;
        if secret.is_empty() {
            return Err(ConfigError(
                "key \"worker_secret\": required (set it in the config file or WORKER_SECRET; \
                 `wavelog-worker gen-secret` makes one)"
                    .into(),
            ));
        }
        if secret.chars().count() < 32 {
            return Err(ConfigError(format!(
                "key \"worker_secret\": too short ({} characters, at least 32 required)",
                secret.chars().count()
            )));
        }
        let redis_url = src.string("redis_url", "")?.trim().to_string();
        if redis_url.starts_with("rediss://") {
            return Err(ConfigError(
                "key \"redis_url\": rediss:// (TLS) is not supported by this build; reach Redis \
                 over a private network or a local TLS tunnel (stunnel) with redis://"
                    .into(),
            ));
        }
        if !redis_url.is_empty() && !redis_url.starts_with("redis://") {
            return Err(ConfigError(format!(
                "key \"redis_url\": expected redis://[user:pass@]host:port/db, got {redis_url:?}"
            )));
        }
        let ping_interval = src.positive_duration("ping_interval", Duration::from_secs(30))?;
        let idle_timeout = src.positive_duration("idle_timeout", Duration::from_secs(60))?;
        if idle_timeout <= ping_interval {
            return Err(ConfigError(format!(
                "key \"idle_timeout\": must be longer than ping_interval ({})",
                duration::format_go(ping_interval)
            )));
        }

        let dxcluster = dxcluster(&src)?;

        Ok(Config {
            dxcluster,
            ws_bind: src.string("ws_bind", "")?,
            ws_port: src.integer("ws_port", 9000, 0, 65535)? as u16,
            internal_bind: src.string("internal_bind", "127.0.0.1")?,
            internal_port: src.integer("internal_port", 9001, 0, 65535)? as u16,
            worker_secret: Secret::new(secret),
            topic_ttl: src.positive_duration("topic_ttl", Duration::from_secs(24 * 3600))?,
            enforce_token_expiry: src.boolean("enforce_token_expiry", false)?,
            auth_timeout: src.positive_duration("auth_timeout", Duration::from_secs(10))?,
            header_timeout: src.positive_duration("header_timeout", Duration::from_secs(10))?,
            ping_interval,
            idle_timeout,
            shutdown_drain: src.duration("shutdown_drain", Duration::from_secs(2))?,
            subscriber_queue: src.integer("subscriber_queue", 256, 1, 1 << 20)? as usize,
            max_payload_bytes: src.integer("max_payload_bytes", 1 << 20, 1, 64 << 20)? as usize,
            redis_url: (!redis_url.is_empty()).then_some(redis_url),
            registry_cache_ttl: src.duration("registry_cache_ttl", Duration::from_secs(2))?,
            allowed_origins: src.list("allowed_origins")?,
            sse_keepalive: src.positive_duration("sse_keepalive", Duration::from_secs(15))?,
            sse_retry: src.positive_duration("sse_retry", Duration::from_secs(2))?,
            history_size: src.integer("history_size", 64, 0, 100_000)? as usize,
            history_ttl: src.positive_duration("history_ttl", Duration::from_secs(300))?,
            max_history_bytes: src.integer("max_history_bytes", 64 << 20, 0, 1 << 40)? as usize,
            max_topics_per_connection: src.integer("max_topics_per_connection", 32, 1, 1024)?
                as usize,
            max_connections: src.integer("max_connections", 20_000, 1, 10_000_000)? as usize,
            max_connections_per_ip: src.integer("max_connections_per_ip", 1_000, 1, 10_000_000)?
                as usize,
            max_topics: src.integer("max_topics", 100_000, 1, 100_000_000)? as usize,
            auth_failure_burst: src.integer("auth_failure_burst", 20, 1, 1_000_000)? as u32,
            auth_failures_per_minute: src.integer("auth_failures_per_minute", 30, 1, 1_000_000)?
                as u32,
            topic_probe_burst: src.integer("topic_probe_burst", 200, 1, 1_000_000)? as u32,
            topic_probes_per_minute: src.integer("topic_probes_per_minute", 120, 1, 1_000_000)?
                as u32,
            inbound_frame_burst: src.integer("inbound_frame_burst", 20, 1, 1_000_000)? as u32,
            inbound_frames_per_second: src.integer("inbound_frames_per_second", 5, 1, 1_000_000)?
                as u32,
            trusted_proxies: src.cidrs("trusted_proxies", &["127.0.0.0/8", "::1"])?,
            log_format: match src.string("log_format", "text")?.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError(format!(
                        "key \"log_format\": expected \"text\" or \"json\", got {other:?}"
                    )))
                }
            },
        })
    }
}

/// The `[dxcluster]` table, validated; `None` without a `host`.
fn dxcluster(src: &Source<'_>) -> Result<Option<DxClusterConfig>, ConfigError> {
    if let Some(table) = src.table.get("dxcluster") {
        let table = table.as_table().ok_or_else(|| {
            ConfigError("key \"dxcluster\": expected a table ([dxcluster])".into())
        })?;
        if let Some(unknown) = table.keys().find(|k| !DXCLUSTER_KEYS.contains(&k.as_str())) {
            return Err(ConfigError(format!(
                "unknown key \"dxcluster.{unknown}\" (known keys: {})",
                DXCLUSTER_KEYS.join(", ")
            )));
        }
    }
    let host = src.string("dxcluster.host", "")?.trim().to_string();
    if host.is_empty() {
        return Ok(None);
    }
    let callsign = src
        .string("dxcluster.callsign", "")?
        .trim()
        .to_ascii_uppercase();
    if callsign.is_empty()
        || !callsign
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '/' || c == '-')
    {
        return Err(ConfigError(format!(
            "key \"dxcluster.callsign\": required with dxcluster.host, a callsign such as \"N0CALL\" (got {callsign:?})"
        )));
    }
    let lookup_url = src.string("dxcluster.lookup_url", "")?.trim().to_string();
    if lookup_url.starts_with("https://") {
        return Err(ConfigError(
            "key \"dxcluster.lookup_url\": https:// is not supported by this build; point it at \
             Wavelog over loopback or the private network (http://127.0.0.1/index.php/api/lookup)"
                .into(),
        ));
    }
    if !lookup_url.is_empty() && !lookup_url.starts_with("http://") {
        return Err(ConfigError(format!(
            "key \"dxcluster.lookup_url\": expected http://host[:port]/path, got {lookup_url:?}"
        )));
    }
    let topic = src.string("dxcluster.topic", "dxspots")?.trim().to_string();
    if topic.is_empty() || topic.len() > crate::protocol::MAX_TOPIC_LEN {
        return Err(ConfigError(
            "key \"dxcluster.topic\": a topic name of 1 to 256 bytes".into(),
        ));
    }
    Ok(Some(DxClusterConfig {
        host,
        port: src.integer("dxcluster.port", 7300, 1, 65535)? as u16,
        callsign,
        password: Secret::new(src.string("dxcluster.password", "")?),
        topic,
        lookup_url: (!lookup_url.is_empty()).then_some(lookup_url),
        lookup_key: Secret::new(src.string("dxcluster.lookup_key", "")?),
        unregister_after: src
            .positive_duration("dxcluster.unregister_after", Duration::from_secs(120))?,
        silence_timeout: src
            .positive_duration("dxcluster.silence_timeout", Duration::from_secs(300))?,
    }))
}

impl Config {
    /// The effective values as TOML, with the secret replaced by a placeholder.
    pub fn to_toml_redacted(&self) -> String {
        let d = |d: Duration| format!("\"{}\"", duration::format_precise(d));
        let s = |s: &str| toml_string(s);
        let origins: Vec<String> = self.allowed_origins.iter().map(|o| s(o)).collect();
        let proxies: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(|c| s(&c.to_string()))
            .collect();
        let lines = [
            ("ws_bind", s(&self.ws_bind)),
            ("ws_port", self.ws_port.to_string()),
            ("internal_bind", s(&self.internal_bind)),
            ("internal_port", self.internal_port.to_string()),
            ("worker_secret", s("[redacted]")),
            ("topic_ttl", d(self.topic_ttl)),
            (
                "enforce_token_expiry",
                self.enforce_token_expiry.to_string(),
            ),
            ("auth_timeout", d(self.auth_timeout)),
            ("header_timeout", d(self.header_timeout)),
            ("ping_interval", d(self.ping_interval)),
            ("idle_timeout", d(self.idle_timeout)),
            ("shutdown_drain", d(self.shutdown_drain)),
            ("subscriber_queue", self.subscriber_queue.to_string()),
            ("max_payload_bytes", self.max_payload_bytes.to_string()),
            (
                "redis_url",
                s(&redact_url(self.redis_url.as_deref().unwrap_or(""))),
            ),
            ("registry_cache_ttl", d(self.registry_cache_ttl)),
            ("allowed_origins", format!("[{}]", origins.join(", "))),
            ("trusted_proxies", format!("[{}]", proxies.join(", "))),
            ("sse_keepalive", d(self.sse_keepalive)),
            ("sse_retry", d(self.sse_retry)),
            ("history_size", self.history_size.to_string()),
            ("history_ttl", d(self.history_ttl)),
            ("max_history_bytes", self.max_history_bytes.to_string()),
            (
                "max_topics_per_connection",
                self.max_topics_per_connection.to_string(),
            ),
            ("max_connections", self.max_connections.to_string()),
            (
                "max_connections_per_ip",
                self.max_connections_per_ip.to_string(),
            ),
            ("max_topics", self.max_topics.to_string()),
            ("auth_failure_burst", self.auth_failure_burst.to_string()),
            (
                "auth_failures_per_minute",
                self.auth_failures_per_minute.to_string(),
            ),
            ("topic_probe_burst", self.topic_probe_burst.to_string()),
            (
                "topic_probes_per_minute",
                self.topic_probes_per_minute.to_string(),
            ),
            ("inbound_frame_burst", self.inbound_frame_burst.to_string()),
            (
                "inbound_frames_per_second",
                self.inbound_frames_per_second.to_string(),
            ),
            (
                "log_format",
                s(match self.log_format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }),
            ),
        ];
        let mut out: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        if let Some(dx) = &self.dxcluster {
            let redacted = |secret: &Secret| {
                if secret.expose().is_empty() {
                    s("")
                } else {
                    s("[redacted]")
                }
            };
            let dx_lines = [
                ("host", s(&dx.host)),
                ("port", dx.port.to_string()),
                ("callsign", s(&dx.callsign)),
                ("password", redacted(&dx.password)),
                ("topic", s(&dx.topic)),
                ("lookup_url", s(dx.lookup_url.as_deref().unwrap_or(""))),
                ("lookup_key", redacted(&dx.lookup_key)),
                ("unregister_after", d(dx.unregister_after)),
                ("silence_timeout", d(dx.silence_timeout)),
            ];
            out.push_str("\n[dxcluster]\n");
            for (k, v) in dx_lines {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, &no_env)
    }

    #[test]
    fn defaults_match_the_go_worker() {
        let c = parse(&format!("worker_secret = \"{SECRET}\"")).unwrap();
        assert_eq!((c.ws_bind.as_str(), c.ws_port), ("", 9000));
        assert_eq!(
            (c.internal_bind.as_str(), c.internal_port),
            ("127.0.0.1", 9001)
        );
        assert_eq!(c.topic_ttl, Duration::from_secs(86400));
        assert!(!c.enforce_token_expiry);
        assert_eq!(format!("{:?}", c.worker_secret), "[redacted]");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("worker_secret = \"short\"", "worker_secret"),
            ("", "worker_secret"),
            (
                &format!("worker_secret = \"{SECRET}\"\nfoo = 1"),
                "unknown key \"foo\"",
            ),
            (
                &format!("worker_secret = \"{SECRET}\"\ntopic_ttl = \"soon\""),
                "topic_ttl",
            ),
            (
                &format!("worker_secret = \"{SECRET}\"\ntopic_ttl = \"0s\""),
                "topic_ttl",
            ),
            (
                &format!("worker_secret = \"{SECRET}\"\nws_port = 70000"),
                "ws_port",
            ),
            (
                &format!("worker_secret = \"{SECRET}\"\nredis_url = \"rediss://x\""),
                "redis_url",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "WORKER_SECRET" => Some("from-env-0123456789abcdef0123456789".to_string()),
            "WORKER_WS_PORT" => Some("9100".to_string()),
            "WORKER_TOPIC_TTL" => Some("90m".to_string()),
            _ => None,
        };
        let c =
            Config::from_toml(&format!("worker_secret = \"{SECRET}\"\nws_port = 1"), &env).unwrap();
        assert_eq!(
            c.worker_secret.expose(),
            b"from-env-0123456789abcdef0123456789"
        );
        assert_eq!(c.ws_port, 9100);
        assert_eq!(c.topic_ttl, Duration::from_secs(5400));
        let bad = |k: &str| (k == "WORKER_WS_PORT").then(|| "x".to_string());
        let err = Config::from_toml(&format!("worker_secret = \"{SECRET}\""), &bad).unwrap_err();
        assert!(err.to_string().contains("WORKER_WS_PORT"), "{err}");
    }

    #[test]
    fn the_dx_cluster_relay_is_configured_by_its_table_or_the_environment() {
        let none = parse(&format!("worker_secret = \"{SECRET}\"")).unwrap();
        assert!(none.dxcluster.is_none(), "off without a host");
        let text = format!(
            "worker_secret = \"{SECRET}\"\n[dxcluster]\nhost = \"dxc.example.org\"\ncallsign = \"n0call\"\n\
             lookup_url = \"http://127.0.0.1/index.php/api/lookup\"\nlookup_key = \"k\""
        );
        let dx = parse(&text).unwrap().dxcluster.unwrap();
        assert_eq!((dx.host.as_str(), dx.port), ("dxc.example.org", 7300));
        assert_eq!(
            (dx.callsign.as_str(), dx.topic.as_str()),
            ("N0CALL", "dxspots")
        );
        assert_eq!(dx.unregister_after, Duration::from_secs(120));
        let env = |k: &str| match k {
            "WORKER_DXCLUSTER_HOST" => Some("other.example.org".to_string()),
            "WORKER_DXCLUSTER_PORT" => Some("8000".to_string()),
            "WORKER_DXCLUSTER_CALLSIGN" => Some("DL1ABC".to_string()),
            _ => None,
        };
        let c = Config::from_toml(&format!("worker_secret = \"{SECRET}\""), &env).unwrap();
        let dx = c.dxcluster.unwrap();
        assert_eq!((dx.host.as_str(), dx.port), ("other.example.org", 8000));
        let redacted = Config::from_toml(&text, &|_| None)
            .unwrap()
            .to_toml_redacted();
        assert!(
            redacted.contains("[dxcluster]") && redacted.contains("lookup_key = \"[redacted]\"")
        );
        for (extra, key) in [
            ("host = \"x\"", "dxcluster.callsign"),
            (
                "host = \"x\"\ncallsign = \"A1A\"\nlookup_url = \"https://x/y\"",
                "dxcluster.lookup_url",
            ),
            ("host = \"x\"\ncallsign = \"A1A\"\nprt = 1", "dxcluster.prt"),
            (
                "host = \"x\"\ncallsign = \"A1A\"\nport = 0",
                "dxcluster.port",
            ),
        ] {
            let err = parse(&format!(
                "worker_secret = \"{SECRET}\"\n[dxcluster]\n{extra}"
            ))
            .unwrap_err();
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }
}
