//! Where a stage finds the URL it works against.

use cd_core::{Error, Result, StageContext};

use crate::http::Url;

/// A URL given directly, or read when the stage runs from a field of an
/// upstream node's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// A fixed URL.
    Fixed(String),
    /// The string field `field` of node `node`'s output. `field` is a JSON
    /// pointer when it starts with `/` (`/rollout/deployed/0/detail/url`);
    /// otherwise a key, looked up at the top of the output object first, then
    /// anywhere inside it (depth first, first match), so `url` finds the URL
    /// of the first deployed revision in a `Deploy` stage's output. A value
    /// without a scheme gets `http://`; a number is taken as a port on
    /// `127.0.0.1`.
    FromOutput {
        /// The upstream node.
        node: String,
        /// The field.
        field: String,
    },
}

impl UrlSource {
    /// Resolves the URL in a running stage.
    pub fn resolve(&self, cx: &StageContext) -> Result<Url> {
        let raw = match self {
            UrlSource::Fixed(url) => url.clone(),
            UrlSource::FromOutput { node, field } => {
                let out = cx.output(node).ok_or_else(|| {
                    Error::invalid(format!(
                        "no output from node `{node}` to read the URL from (add `{node}` to this node's needs)"
                    ))
                    .with("node", cx.node())
                })?;
                let value = if field.starts_with('/') {
                    out.value().pointer(field).cloned()
                } else {
                    out.get(field)
                        .cloned()
                        .or_else(|| find_key(out.value(), field).cloned())
                };
                match value {
                    Some(serde_json::Value::String(s)) => s,
                    Some(serde_json::Value::Number(n)) => format!("http://127.0.0.1:{n}"),
                    Some(other) => {
                        return Err(Error::invalid(format!(
                            "field `{field}` of node `{node}`'s output is not a URL: {other}"
                        ))
                        .with("node", cx.node()))
                    }
                    None => {
                        return Err(Error::invalid(format!(
                            "node `{node}`'s output has no field `{field}`: {}",
                            out.value()
                        ))
                        .with("node", cx.node()))
                    }
                }
            }
        };
        Url::parse(&raw).map_err(|e| cd_core::Error::from(e).with("node", cx.node()))
    }

    /// For descriptions: the URL, or `<node>.<field>`.
    pub fn describe(&self) -> String {
        match self {
            UrlSource::Fixed(url) => url.clone(),
            UrlSource::FromOutput { node, field } => format!("{node}.{field}"),
        }
    }
}

/// The first value under `key` anywhere in `value`, depth first.
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_anywhere() {
        let v = serde_json::json!({
            "environment": "staging",
            "rollout": {"deployed": [{"detail": {"url": "http://127.0.0.1:1"}}, {"detail": {"url": "x"}}]}
        });
        assert_eq!(
            find_key(&v, "url"),
            Some(&serde_json::json!("http://127.0.0.1:1"))
        );
        assert_eq!(
            find_key(&v, "environment"),
            Some(&serde_json::json!("staging"))
        );
        assert_eq!(find_key(&v, "nope"), None);
    }
}
