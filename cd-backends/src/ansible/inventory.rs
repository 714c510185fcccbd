//! Inventories generated from targets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cd_core::Target;
use serde_json::{json, Map, Value};

/// Target label: the SSH user.
pub const USER_LABEL: &str = "user";
/// Target label: the private key file.
pub const KEY_LABEL: &str = "key_file";
/// Target label: inventory groups, comma-separated.
pub const GROUPS_LABEL: &str = "groups";
/// Target label: what `--limit` gets for this target (a group, a pattern);
/// default the target's name.
pub const LIMIT_LABEL: &str = "ansible_limit";

/// One inventory host.
///
/// ```
/// use cd_backends::ansible::AnsibleHost;
/// let h = AnsibleHost::new("web1").address("127.0.0.2").port(2222).user("deploy").groups(["web"]);
/// let t = h.to_target();
/// assert_eq!(t.address.as_deref(), Some("127.0.0.2:2222"));
/// assert_eq!(AnsibleHost::from_target(&t), h);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsibleHost {
    /// The inventory name (also the target's name).
    pub name: String,
    /// Where to connect (`ansible_host`); default the name.
    pub address: Option<String>,
    /// SSH port (`ansible_port`).
    pub port: Option<u16>,
    /// SSH user (`ansible_user`).
    pub user: Option<String>,
    /// Private key (`ansible_ssh_private_key_file`).
    pub key_file: Option<PathBuf>,
    /// Groups the host belongs to.
    pub groups: Vec<String>,
    /// Further host variables.
    pub vars: BTreeMap<String, Value>,
}

impl AnsibleHost {
    /// A host with a name.
    pub fn new(name: impl Into<String>) -> Self {
        AnsibleHost {
            name: name.into(),
            address: None,
            port: None,
            user: None,
            key_file: None,
            groups: Vec::new(),
            vars: BTreeMap::new(),
        }
    }

    /// The address to connect to.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// The SSH port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The SSH user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The private key file.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_file = Some(path.into());
        self
    }

    /// The groups.
    pub fn groups<I, S>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.groups = groups.into_iter().map(Into::into).collect();
        self
    }

    /// A host variable.
    pub fn var(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    /// The host as a pipeline [`Target`]: address `host:port`, labels
    /// `user`, `key_file`, `groups`.
    pub fn to_target(&self) -> Target {
        let mut t = Target::new(&self.name);
        if let Some(a) = &self.address {
            t = t.address(match self.port {
                Some(p) => format!("{a}:{p}"),
                None => a.clone(),
            });
        }
        if let Some(u) = &self.user {
            t = t.label(USER_LABEL, u);
        }
        if let Some(k) = &self.key_file {
            t = t.label(KEY_LABEL, k.display().to_string());
        }
        if !self.groups.is_empty() {
            t = t.label(GROUPS_LABEL, self.groups.join(","));
        }
        t
    }

    /// Reads a host from a [`Target`] (the inverse of [`AnsibleHost::to_target`]).
    /// An address `host:port` gives both; labels give user, key and groups.
    pub fn from_target(t: &Target) -> Self {
        let mut h = AnsibleHost::new(&t.name);
        if let Some(addr) = &t.address {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') || host.starts_with('[') => {
                    match port.parse::<u16>() {
                        Ok(p) => {
                            h.address = Some(host.trim_matches(['[', ']']).to_string());
                            h.port = Some(p);
                        }
                        Err(_) => h.address = Some(addr.clone()),
                    }
                }
                _ => h.address = Some(addr.clone()),
            }
        }
        h.user = t.label_value(USER_LABEL).map(str::to_string);
        h.key_file = t.label_value(KEY_LABEL).map(PathBuf::from);
        h.groups = t
            .label_value(GROUPS_LABEL)
            .map(|g| {
                g.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        h
    }
}

/// An inventory (YAML-plugin format, written as JSON) for `hosts`.
pub fn inventory_json(hosts: &[AnsibleHost], common: &BTreeMap<String, Value>) -> Value {
    let mut all_hosts = Map::new();
    let mut groups: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for h in hosts {
        let mut vars = Map::new();
        if let Some(a) = &h.address {
            vars.insert("ansible_host".into(), json!(a));
        }
        if let Some(p) = h.port {
            vars.insert("ansible_port".into(), json!(p));
        }
        if let Some(u) = &h.user {
            vars.insert("ansible_user".into(), json!(u));
        }
        if let Some(k) = &h.key_file {
            vars.insert(
                "ansible_ssh_private_key_file".into(),
                json!(k.display().to_string()),
            );
        }
        for (k, v) in &h.vars {
            vars.insert(k.clone(), v.clone());
        }
        all_hosts.insert(h.name.clone(), Value::Object(vars));
        for g in &h.groups {
            groups
                .entry(g.clone())
                .or_default()
                .insert(h.name.clone(), json!({}));
        }
    }
    let children: Map<String, Value> = groups
        .into_iter()
        .map(|(g, hosts)| (g, json!({ "hosts": hosts })))
        .collect();
    json!({
        "all": {
            "hosts": all_hosts,
            "vars": common,
            "children": children,
        }
    })
}
