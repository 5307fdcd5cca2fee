//! Connection configuration: a URL whose scheme picks the backend, plus options.
//!
//! Options come from the URL's query string (`memory://?max_payload_bytes=1024`) and from the
//! `options` table of a config file; a backend rejects options it does not know. Credentials
//! (the URL's password, and options named like secrets) never appear in `Debug`, `Display`,
//! errors or logs.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;
use url::Url;

use crate::{Error, Result};

/// Environment variable [`Config::from_env`] reads the URL from.
pub const ENV_URL: &str = "SPINDLE_URL";
/// Prefix of environment variables [`Config::from_env`] reads options from:
/// `SPINDLE_OPTION_PREFETCH=200` sets option `prefetch`.
pub const ENV_OPTION_PREFIX: &str = "SPINDLE_OPTION_";

const REDACTED: &str = "***";

/// Where and how to connect.
///
/// ```
/// use spindle_core::Config;
/// let config = Config::parse("amqp://app:hunter2@localhost:5672/%2f?prefetch=200").unwrap();
/// assert_eq!(config.scheme(), "amqp");
/// assert_eq!(config.option("prefetch"), Some("200"));
/// assert!(!format!("{config:?}").contains("hunter2"));
/// assert!(!config.redacted_url().contains("hunter2"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    url: Url,
    options: BTreeMap<String, String>,
}

impl Config {
    /// Parses a URL; its query parameters become options.
    pub fn parse(url: &str) -> Result<Self> {
        let mut parsed = Url::parse(url.trim()).map_err(|e| {
            Error::InvalidConfig(format!("malformed URL `{}`: {e}", redact_str(url)))
        })?;
        let mut options = BTreeMap::new();
        for (name, value) in parsed.query_pairs() {
            let name = name.into_owned();
            if options.insert(name.clone(), value.into_owned()).is_some() {
                return Err(Error::InvalidConfig(format!(
                    "option `{name}` is given twice in the URL"
                )));
            }
        }
        parsed.set_query(None);
        Ok(Config {
            url: parsed,
            options,
        })
    }

    /// Reads `SPINDLE_URL` and any `SPINDLE_OPTION_<NAME>` variables (names lower-cased).
    pub fn from_env() -> Result<Self> {
        let url = std::env::var(ENV_URL).map_err(|_| {
            Error::InvalidConfig(format!("environment variable {ENV_URL} is not set"))
        })?;
        let mut config = Config::parse(&url)?;
        for (name, value) in std::env::vars() {
            if let Some(option) = name.strip_prefix(ENV_OPTION_PREFIX) {
                config = config.with_option(option.to_ascii_lowercase(), value);
            }
        }
        Ok(config)
    }

    /// Reads a TOML (`.toml`) or JSON (any other extension) file of the form
    /// `url = "..."` with an optional `[options]` table.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::InvalidConfig(format!("cannot read config file {}: {e}", path.display()))
        })?;
        if path.extension().is_some_and(|ext| ext == "toml") {
            Self::from_toml(&text)
        } else {
            Self::from_json(&text)
        }
    }

    /// Parses TOML text: `url = "..."` and an optional `[options]` table.
    pub fn from_toml(text: &str) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| Error::InvalidConfig(format!("config: {}", e.message())))?;
        raw.try_into()
    }

    /// Parses JSON text: `{"url": "...", "options": {...}}`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| Error::InvalidConfig(format!("config: {e}")))?;
        raw.try_into()
    }

    /// Adds or replaces an option.
    pub fn with_option(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(name.into(), value.into());
        self
    }

    /// The URL scheme, which picks the backend.
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The URL, credentials included, without options. Pass it only to the broker client.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The URL with its password replaced by `***`: safe for logs and errors.
    pub fn redacted_url(&self) -> String {
        let mut url = self.url.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some(REDACTED));
        }
        url.to_string()
    }

    /// One option's raw value.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.get(name).map(String::as_str)
    }

    /// All options.
    pub fn options(&self) -> &BTreeMap<String, String> {
        &self.options
    }

    /// A reader that takes typed options one by one and, at the end, rejects the rest.
    pub fn option_reader(&self, backend: &'static str) -> OptionReader {
        OptionReader {
            backend,
            remaining: self.options.clone(),
            known: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_option(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("Config")
            .field("url", &self.redacted_url())
            .field("options", &options)
            .finish()
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

impl FromStr for Config {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Config::parse(s)
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = RawConfig::deserialize(deserializer)?;
        raw.try_into().map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    url: String,
    #[serde(default)]
    options: BTreeMap<String, OptionValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OptionValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Flag(bool),
}

impl TryFrom<RawConfig> for Config {
    type Error = Error;
    fn try_from(raw: RawConfig) -> Result<Self> {
        let mut config = Config::parse(&raw.url)?;
        for (name, value) in raw.options {
            let value = match value {
                OptionValue::Text(s) => s,
                OptionValue::Integer(i) => i.to_string(),
                OptionValue::Float(x) => x.to_string(),
                OptionValue::Flag(b) => b.to_string(),
            };
            config.options.insert(name, value);
        }
        Ok(config)
    }
}

/// Whether an option's value must be hidden.
pub fn is_secret_option(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "credential", "sasl"]
        .iter()
        .any(|s| name.contains(s))
}

/// Best-effort redaction of a string that failed to parse as a URL: hide `user:pass@`.
fn redact_str(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(start), Some(at)) if at > start => {
            format!("{}://{REDACTED}@{}", &url[..start], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Takes typed options from a [`Config`] and rejects unknown ones by name.
///
/// ```
/// use spindle_core::Config;
/// let config = Config::parse("memory://?prefetch=10&typo=1").unwrap();
/// let mut options = config.option_reader("memory");
/// assert_eq!(options.parse::<usize>("prefetch").unwrap(), Some(10));
/// let err = options.finish().unwrap_err().to_string();
/// assert!(err.contains("typo") && err.contains("prefetch"));
/// ```
#[derive(Debug)]
pub struct OptionReader {
    backend: &'static str,
    remaining: BTreeMap<String, String>,
    known: Vec<&'static str>,
}

impl OptionReader {
    /// Takes an option as text.
    pub fn string(&mut self, name: &'static str) -> Option<String> {
        self.known.push(name);
        self.remaining.remove(name)
    }

    /// Takes an option and parses it, naming the option on failure.
    pub fn parse<T: FromStr>(&mut self, name: &'static str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        let secret = is_secret_option(name);
        match self.string(name) {
            None => Ok(None),
            Some(raw) => raw.parse::<T>().map(Some).map_err(|e| {
                let shown = if secret { REDACTED.to_string() } else { raw };
                Error::InvalidConfig(format!(
                    "{}: option `{name}` has invalid value `{shown}`: {e}",
                    self.backend
                ))
            }),
        }
    }

    /// Takes a duration option given in milliseconds.
    pub fn millis(&mut self, name: &'static str) -> Result<Option<std::time::Duration>> {
        Ok(self
            .parse::<u64>(name)?
            .map(std::time::Duration::from_millis))
    }

    /// Fails if any option was not taken, naming it and the options this backend knows.
    pub fn finish(self) -> Result<()> {
        if let Some(name) = self.remaining.keys().next() {
            return Err(Error::InvalidConfig(format!(
                "{}: unknown option `{name}`; known options are: {}",
                self.backend,
                if self.known.is_empty() {
                    "none".to_string()
                } else {
                    self.known.join(", ")
                }
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scheme_and_options() {
        let c = Config::parse("kafka://127.0.0.1:9092?hosts=a:1,b:2&linger_ms=5").unwrap();
        assert_eq!(c.scheme(), "kafka");
        assert_eq!(c.option("hosts"), Some("a:1,b:2"));
        assert_eq!(c.option("linger_ms"), Some("5"));
        assert_eq!(c.url().query(), None);
    }

    #[test]
    fn malformed_urls_are_invalid_config() {
        for bad in [
            "",
            "not a url",
            "://missing-scheme",
            "amqp://[::1",
            "memory",
        ] {
            let err = Config::parse(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{bad}: {err:?}");
            assert!(err.to_string().contains("malformed URL"), "{err}");
        }
    }

    #[test]
    fn duplicate_option_is_rejected() {
        let err = Config::parse("memory://?a=1&a=2").unwrap_err();
        assert!(err.to_string().contains("`a` is given twice"), "{err}");
    }

    #[test]
    fn credentials_are_redacted_everywhere() {
        let c = Config::parse("amqp://user:s3cr3t@host/%2f?sasl_password=p4ss&prefetch=5").unwrap();
        for shown in [format!("{c:?}"), format!("{c}"), c.redacted_url()] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(!shown.contains("p4ss"), "{shown}");
        }
        assert!(format!("{c:?}").contains("prefetch"));
        assert_eq!(c.url().password(), Some("s3cr3t"));
        // A URL that fails to parse does not leak its password in the error.
        let err = Config::parse("amqp://user:s3cr3t@[bad").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        // Nor does a bad value of a secret option.
        let c = Config::parse("x://h?password_ms=s3cr3t").unwrap();
        let err = c.option_reader("x").millis("password_ms").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn unknown_option_names_itself_and_the_known_ones() {
        let c = Config::parse("memory://?prefetch=1&bogus=2").unwrap();
        let mut r = c.option_reader("memory");
        r.parse::<usize>("prefetch").unwrap();
        let err = r.finish().unwrap_err().to_string();
        assert!(err.contains("unknown option `bogus`"), "{err}");
        assert!(err.contains("known options are: prefetch"), "{err}");
    }

    #[test]
    fn bad_option_value_names_option() {
        let c = Config::parse("memory://?prefetch=lots").unwrap();
        let err = c
            .option_reader("memory")
            .parse::<usize>("prefetch")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`prefetch`") && err.contains("lots"), "{err}");
    }

    #[test]
    fn toml_and_json_files() {
        let toml = "url = \"memory://\"\n[options]\nmax_payload_bytes = 1024\nflag = true\n";
        let c = Config::from_toml(toml).unwrap();
        assert_eq!(c.option("max_payload_bytes"), Some("1024"));
        assert_eq!(c.option("flag"), Some("true"));
        let c = Config::from_json(r#"{"url":"memory://?a=1","options":{"b":"2"}}"#).unwrap();
        assert_eq!(c.option("a"), Some("1"));
        assert_eq!(c.option("b"), Some("2"));
        let err = Config::from_json(r#"{"url":"memory://","colour":"red"}"#).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::from_toml("url = \"::bad\"").unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    }

    #[test]
    fn file_and_env() {
        let dir = std::env::temp_dir().join(format!("spindle-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spindle.toml");
        std::fs::write(&path, "url = \"memory://\"\n").unwrap();
        assert_eq!(Config::from_file(&path).unwrap().scheme(), "memory");
        let missing = Config::from_file(dir.join("absent.toml")).unwrap_err();
        assert!(missing.to_string().contains("absent.toml"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serde_deserialize() {
        let c: Config = serde_json::from_str(r#"{"url":"sqs://?region=us-east-1"}"#).unwrap();
        assert_eq!(c.option("region"), Some("us-east-1"));
    }
}
