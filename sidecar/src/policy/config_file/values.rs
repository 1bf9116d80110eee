//! Values of the config file and flags: how each type of value is read, and the error of a bad key.
use std::time::Duration;

use toml::Value;

use crate::policy::retry::FailureSet;
use crate::units::parse_duration;

/// One bad key: where (file section and key, or flag), the value given, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub value: String,
    pub problem: String,
}

/// A value as given: from TOML (typed) or from a flag / environment variable (always text).
#[derive(Debug, Clone, Copy)]
pub(super) enum Raw<'a> {
    Toml(&'a Value),
    Text(&'a str),
}

impl<'a> Raw<'a> {
    /// The value as the user wrote it, for error messages.
    pub(super) fn shown(&self) -> String {
        match self.text() {
            Some(s) => s.to_owned(),
            None => match self {
                Raw::Toml(v) => v.to_string(),
                Raw::Text(s) => (*s).to_owned(),
            },
        }
    }

    /// A string value (all flag values are).
    pub(super) fn text(&self) -> Option<&'a str> {
        match *self {
            Raw::Text(s) => Some(s),
            Raw::Toml(Value::String(s)) => Some(s.as_str()),
            Raw::Toml(_) => None,
        }
    }
}

pub(super) fn duration(v: Raw<'_>) -> Result<Duration, String> {
    match v.text() {
        Some(s) => parse_duration(s),
        None => Err("expected a duration string with a unit, e.g. \"500ms\" or \"2s\"".to_owned()),
    }
}

pub(super) fn positive_duration(v: Raw<'_>) -> Result<Duration, String> {
    let d = duration(v)?;
    if d.is_zero() {
        return Err("must be greater than zero".to_owned());
    }
    Ok(d)
}

pub(super) fn count(v: Raw<'_>, min: u32, max: u32) -> Result<u32, String> {
    let expected = || format!("expected a whole number from {min} to {max}");
    let n: i64 = match (v, v.text()) {
        (Raw::Toml(Value::Integer(n)), _) => *n,
        (_, Some(s)) => s.trim().parse().map_err(|_| expected())?,
        (_, None) => return Err(expected()),
    };
    match u32::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from {min} to {max}")),
    }
}

pub(super) fn number(v: Raw<'_>, expected: &str) -> Result<f64, String> {
    let x = match (v, v.text()) {
        (Raw::Toml(Value::Float(x)), _) => *x,
        (Raw::Toml(Value::Integer(n)), _) => *n as f64,
        (_, Some(s)) => {
            let s = s.trim();
            match s.strip_suffix('%') {
                Some(pct) => pct.trim().parse::<f64>().map(|p| p / 100.0),
                None => s.parse::<f64>(),
            }
            .map_err(|_| expected.to_owned())?
        }
        (_, None) => return Err(expected.to_owned()),
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(expected.to_owned())
    }
}

pub(super) fn rate(v: Raw<'_>) -> Result<Option<f64>, String> {
    if v.text()
        .is_some_and(|s| s.trim().eq_ignore_ascii_case("off"))
    {
        return Ok(None);
    }
    let expected = "expected a fraction above 0 and at most 1 (e.g. 0.5 or \"50%\"), or \"off\"";
    match number(v, expected)? {
        x if x > 0.0 && x <= 1.0 => Ok(Some(x)),
        _ => Err(expected.to_owned()),
    }
}

pub(super) fn ratio(v: Raw<'_>) -> Result<f64, String> {
    let expected = "expected a fraction from 0 to 1 (e.g. 0.2 or \"20%\")";
    match number(v, expected)? {
        x if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(expected.to_owned()),
    }
}

/// `["connect", "reset", "timeout", "5xx", "503"]` or `"connect,reset,503"`.
pub(super) fn failure_set(v: Raw<'_>, for_breaker: bool) -> Result<FailureSet, String> {
    let items: Vec<&str> = match (v, v.text()) {
        (_, Some(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect(),
        (Raw::Toml(Value::Array(a)), _) => {
            let mut items = Vec::with_capacity(a.len());
            for item in a {
                match item {
                    Value::String(s) => items.push(s.trim()),
                    Value::Integer(n) => {
                        return Err(format!(
                            "write status codes as strings: \"{n}\" (a list of strings)"
                        ))
                    }
                    _ => return Err("expected a list of strings".to_owned()),
                }
            }
            items
        }
        (_, None) => return Err("expected a list of strings".to_owned()),
    };
    let kinds = if for_breaker {
        "connect, reset, timeout, 5xx or a status code 500-599"
    } else {
        "connect, reset, 5xx or a status code 500-599"
    };
    let mut set = FailureSet::empty();
    for item in items {
        match item.to_ascii_lowercase().as_str() {
            "connect" => set.connect = true,
            "reset" => set.reset = true,
            "timeout" if for_breaker => set.timeout = true,
            "timeout" => {
                return Err(
                    "timeouts are not retried: the request timeout covers all attempts; \
                     use connect, reset, 5xx or status codes"
                        .to_owned(),
                )
            }
            "5xx" => set.add_all_5xx(),
            code => {
                let ok = code.parse::<u16>().is_ok_and(|c| set.add_status(c));
                if !ok {
                    return Err(format!("unknown entry {item:?}; expected {kinds}"));
                }
            }
        }
    }
    Ok(set)
}
