//! The typed plan: what `terraform show -json <planfile>` says a plan does.

use std::collections::BTreeMap;

use cd_core::{Change, ChangeAction, Plan};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::TerraformError;
use super::ui::PlannedChange;

/// A saved terraform plan, as `terraform show -json` describes it: resource
/// changes with their actions and addresses, and output changes. Sensitive
/// values are masked (`"(sensitive)"`).
///
/// It is the output of planning, so a policy gate or an approver can look at
/// it before anything is applied:
///
/// ```
/// use cd_backends::terraform::TerraformPlan;
/// let json = r#"{"format_version":"0.2","terraform_version":"1.0.3",
///   "resource_changes":[{"address":"null_resource.db","mode":"managed","type":"null_resource",
///     "name":"db","provider_name":"registry.terraform.io/hashicorp/null",
///     "change":{"actions":["delete","create"],"before":{},"after":{}}}],
///   "output_changes":{"url":{"actions":["update"],"before":"a","after":"b"}}}"#;
/// let plan = TerraformPlan::parse(json).unwrap();
/// assert!(!plan.replaces().is_empty());
/// assert!(plan.destroys_any(&["null_resource.db"]));
/// assert_eq!(plan.output_changes["url"].action, cd_core::ChangeAction::Update);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerraformPlan {
    /// The JSON format version.
    #[serde(default)]
    pub format_version: String,
    /// The terraform version that made the plan.
    #[serde(default)]
    pub terraform_version: String,
    /// Every resource terraform considered, with what happens to it.
    #[serde(default)]
    pub resource_changes: Vec<ResourceChange>,
    /// Every root-module output, with what happens to it.
    #[serde(default)]
    pub output_changes: BTreeMap<String, OutputChange>,
    /// `true` when the plan was built from terraform's streamed
    /// `planned_change` lines only ([`super::TerraformDeployer::show_plan`]
    /// off): addresses and actions of changed resources, no values, no
    /// unchanged resources, no output changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// What happens to one resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceChange {
    /// Full address (`module.net.null_resource.a[0]`).
    pub address: String,
    /// Module address, if not the root module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_address: Option<String>,
    /// `managed` or `data`.
    #[serde(default)]
    pub mode: String,
    /// Resource type (`null_resource`).
    #[serde(rename = "type", default)]
    pub resource_type: String,
    /// Resource name.
    #[serde(default)]
    pub name: String,
    /// Provider address.
    #[serde(default)]
    pub provider_name: String,
    /// The action, one of create / update / replace / delete / read / no-op.
    pub action: ChangeAction,
    /// Terraform's raw action list (`["delete", "create"]`).
    pub actions: Vec<String>,
    /// Why a replacement happens (`replace_because_cannot_update`), if terraform says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_reason: Option<String>,
    /// The values before (null when created).
    #[serde(default)]
    pub before: Value,
    /// The values after, as far as known (null when deleted).
    #[serde(default)]
    pub after: Value,
    /// Which `after` values are known only after apply.
    #[serde(default)]
    pub after_unknown: Value,
}

/// What happens to one output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputChange {
    /// The action: create / update / delete / no-op.
    pub action: ChangeAction,
    /// Terraform's raw action list.
    pub actions: Vec<String>,
    /// The value before.
    #[serde(default)]
    pub before: Value,
    /// The value after (null while unknown).
    #[serde(default)]
    pub after: Value,
    /// Whether the value is known only after apply.
    #[serde(default)]
    pub after_unknown: bool,
    /// Whether the output is sensitive (its values are masked here).
    #[serde(default)]
    pub sensitive: bool,
}

/// Counts of a plan's resource changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanCounts {
    /// Resources created (replacements included).
    pub add: usize,
    /// Resources changed in place.
    pub change: usize,
    /// Resources destroyed (replacements included).
    pub destroy: usize,
}

const SENSITIVE: &str = "(sensitive)";

/// Maps terraform's action list to a [`ChangeAction`].
pub fn action_from_list(actions: &[String]) -> ChangeAction {
    let a: Vec<&str> = actions.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["create"] => ChangeAction::Create,
        ["update"] => ChangeAction::Update,
        ["delete"] => ChangeAction::Delete,
        ["read"] => ChangeAction::Read,
        ["delete", "create"] | ["create", "delete"] => ChangeAction::Replace,
        _ => ChangeAction::NoOp,
    }
}

impl TerraformPlan {
    /// Parses the output of `terraform show -json <planfile>`.
    pub fn parse(json: &str) -> Result<TerraformPlan, TerraformError> {
        let raw: Value = serde_json::from_str(json).map_err(|e| TerraformError::Parse {
            command: "show -json".into(),
            message: e.to_string(),
        })?;
        Ok(Self::from_value(&raw))
    }

    /// Builds the typed plan from the parsed JSON of `terraform show -json`.
    pub fn from_value(raw: &Value) -> TerraformPlan {
        let s = |v: &Value, k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let mut resource_changes = Vec::new();
        for rc in raw
            .get("resource_changes")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let change = rc.get("change").cloned().unwrap_or(Value::Null);
            let actions = string_list(change.get("actions"));
            let before = mask(
                change.get("before").cloned().unwrap_or(Value::Null),
                change.get("before_sensitive"),
            );
            let after = mask(
                change.get("after").cloned().unwrap_or(Value::Null),
                change.get("after_sensitive"),
            );
            resource_changes.push(ResourceChange {
                address: s(rc, "address"),
                module_address: rc
                    .get("module_address")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                mode: s(rc, "mode"),
                resource_type: s(rc, "type"),
                name: s(rc, "name"),
                provider_name: s(rc, "provider_name"),
                action: action_from_list(&actions),
                actions,
                action_reason: rc
                    .get("action_reason")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                before,
                after,
                after_unknown: change.get("after_unknown").cloned().unwrap_or(Value::Null),
            });
        }
        let mut output_changes = BTreeMap::new();
        if let Some(outs) = raw.get("output_changes").and_then(Value::as_object) {
            for (name, change) in outs {
                let actions = string_list(change.get("actions"));
                let sensitive = change.get("before_sensitive") == Some(&Value::Bool(true))
                    || change.get("after_sensitive") == Some(&Value::Bool(true));
                let hide = |v: Option<&Value>| match v {
                    Some(Value::Null) | None => Value::Null,
                    Some(_) if sensitive => Value::String(SENSITIVE.into()),
                    Some(v) => v.clone(),
                };
                output_changes.insert(
                    name.clone(),
                    OutputChange {
                        action: action_from_list(&actions),
                        actions,
                        before: hide(change.get("before")),
                        after: hide(change.get("after")),
                        after_unknown: change.get("after_unknown") == Some(&Value::Bool(true)),
                        sensitive,
                    },
                );
            }
        }
        TerraformPlan {
            format_version: s(raw, "format_version"),
            terraform_version: s(raw, "terraform_version"),
            resource_changes,
            output_changes,
            partial: false,
        }
    }

    /// A partial plan from the `planned_change` lines terraform streams
    /// while planning (see [`TerraformPlan::partial`]).
    pub fn from_planned_changes(changes: &[PlannedChange]) -> TerraformPlan {
        let resource_changes = changes
            .iter()
            .map(|c| {
                let actions: Vec<String> = match c.action.as_str() {
                    "replace" => vec!["delete".into(), "create".into()],
                    "noop" => vec!["no-op".into()],
                    other => vec![other.to_string()],
                };
                let r = &c.resource;
                ResourceChange {
                    address: r.addr.clone(),
                    module_address: (!r.module.is_empty()).then(|| r.module.clone()),
                    mode: if r.addr.starts_with("data.") || r.addr.contains(".data.") {
                        "data".into()
                    } else {
                        "managed".into()
                    },
                    resource_type: r.resource_type.clone(),
                    name: r.resource_name.clone(),
                    provider_name: String::new(),
                    action: action_from_list(&actions),
                    actions,
                    action_reason: c.reason.clone(),
                    before: Value::Null,
                    after: Value::Null,
                    after_unknown: Value::Null,
                }
            })
            .collect();
        TerraformPlan {
            format_version: String::new(),
            terraform_version: String::new(),
            resource_changes,
            output_changes: BTreeMap::new(),
            partial: true,
        }
    }

    /// The plan as generic [`Change`]s: resource changes by address, then
    /// output changes as `output.<name>`.
    pub fn changes(&self) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .resource_changes
            .iter()
            .map(|rc| {
                let mut c = Change::new(rc.action, &rc.address);
                c.detail = serde_json::json!({
                    "actions": rc.actions,
                    "reason": rc.action_reason,
                    "before": rc.before,
                    "after": rc.after,
                });
                c
            })
            .collect();
        out.extend(self.output_changes.iter().map(|(name, oc)| {
            let mut c = Change::new(oc.action, format!("output.{name}"));
            c.detail = serde_json::json!({"before": oc.before, "after": oc.after, "sensitive": oc.sensitive});
            c
        }));
        out
    }

    /// Whether applying the plan would change any resource or output.
    pub fn has_changes(&self) -> bool {
        self.resource_changes
            .iter()
            .any(|c| c.action != ChangeAction::NoOp && c.action != ChangeAction::Read)
            || self
                .output_changes
                .values()
                .any(|c| c.action != ChangeAction::NoOp)
    }

    /// Resource changes with one action.
    pub fn with_action(&self, action: ChangeAction) -> Vec<&ResourceChange> {
        self.resource_changes
            .iter()
            .filter(|c| c.action == action)
            .collect()
    }

    /// Resources that are created.
    pub fn creates(&self) -> Vec<&ResourceChange> {
        self.with_action(ChangeAction::Create)
    }

    /// Resources changed in place.
    pub fn updates(&self) -> Vec<&ResourceChange> {
        self.with_action(ChangeAction::Update)
    }

    /// Resources destroyed and created again.
    pub fn replaces(&self) -> Vec<&ResourceChange> {
        self.with_action(ChangeAction::Replace)
    }

    /// Resources destroyed.
    pub fn deletes(&self) -> Vec<&ResourceChange> {
        self.with_action(ChangeAction::Delete)
    }

    /// The change for one resource address.
    pub fn resource(&self, address: &str) -> Option<&ResourceChange> {
        self.resource_changes.iter().find(|c| c.address == address)
    }

    /// Whether any resource whose address equals one of `protected`, or
    /// starts with one of them followed by `.` or `[`, is deleted or
    /// replaced. The check a policy gate makes: "no delete of a protected
    /// resource".
    pub fn destroys_any(&self, protected: &[&str]) -> bool {
        self.resource_changes.iter().any(|c| {
            matches!(c.action, ChangeAction::Delete | ChangeAction::Replace)
                && protected.iter().any(|p| {
                    c.address == *p
                        || c.address
                            .strip_prefix(p)
                            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
                })
        })
    }

    /// Counts of created, changed and destroyed resources.
    pub fn counts(&self) -> PlanCounts {
        let mut n = PlanCounts::default();
        for c in &self.resource_changes {
            match c.action {
                ChangeAction::Create => n.add += 1,
                ChangeAction::Update => n.change += 1,
                ChangeAction::Delete => n.destroy += 1,
                ChangeAction::Replace => {
                    n.add += 1;
                    n.destroy += 1
                }
                _ => {}
            }
        }
        n
    }

    /// Reads the typed plan back from a [`Plan`] made by
    /// [`super::TerraformDeployer`] (it sits in `plan.detail.terraform_plan`).
    pub fn from_plan(plan: &Plan) -> Option<TerraformPlan> {
        serde_json::from_value(plan.detail.get("terraform_plan")?.clone()).ok()
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces the parts of `value` that `sensitive` marks with `"(sensitive)"`.
fn mask(value: Value, sensitive: Option<&Value>) -> Value {
    match (value, sensitive) {
        (Value::Null, _) => Value::Null,
        (_, Some(Value::Bool(true))) => Value::String(SENSITIVE.into()),
        (Value::Object(map), Some(Value::Object(s))) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let m = mask(v, s.get(&k));
                    (k, m)
                })
                .collect(),
        ),
        (Value::Array(items), Some(Value::Array(s))) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| mask(v, s.get(i)))
                .collect(),
        ),
        (v, _) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_sensitive_values() {
        let v = serde_json::json!({"a": 1, "b": {"c": "secret", "d": 2}, "e": ["x", "y"]});
        let s = serde_json::json!({"b": {"c": true}, "e": [false, true]});
        let m = mask(v, Some(&s));
        assert_eq!(
            m,
            serde_json::json!({"a": 1, "b": {"c": "(sensitive)", "d": 2}, "e": ["x", "(sensitive)"]})
        );
    }

    #[test]
    fn maps_actions() {
        let l = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            action_from_list(&l(&["create", "delete"])),
            ChangeAction::Replace
        );
        assert_eq!(action_from_list(&l(&["no-op"])), ChangeAction::NoOp);
        assert_eq!(action_from_list(&l(&["update"])), ChangeAction::Update);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any `terraform show -json` output: a plan or a typed error.
        #[test]
        fn plan_json_never_panics(doc in crate::fuzz::json(), text in "\\PC{0,100}") {
            let _ = TerraformPlan::from_value(&doc);
            let _ = TerraformPlan::parse(&doc.to_string());
            let _ = TerraformPlan::parse(&text);
        }
    }
}
