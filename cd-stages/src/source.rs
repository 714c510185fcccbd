//! Where a stage finds the URL it works against.

use cd_core::{Error, Result, StageContext};

use crate::http::Url;

/// A URL given directly, or read when the stage runs from a field of an
/// upstream node's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlSource {
    /// A fixed URL.
    Fixed(String),
    /// The string field `field` of node `node`'s output. `field` is a key of
    /// the output object, or a JSON pointer when it starts with `/`
    /// (`/slots/green/url`). A value without a scheme gets `http://`; a
    /// number is taken as a port on `127.0.0.1`.
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
                    out.get(field).cloned()
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
