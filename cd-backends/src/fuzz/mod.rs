//! Property tests over every parser of outside input (issue 10): whatever a
//! host, a tool or a file says, parsing does not panic, stays bounded, and
//! yields a value or a typed error. Run with the unit tests (`cargo test`,
//! stable toolchain, proptest).

#![cfg(test)]

use proptest::prelude::*;
use serde_json::Value;

#[allow(dead_code)] // not every backend feature uses it
/// Arbitrary JSON, biased towards the field names the parsers look at
/// (Terraform's `resource_changes`/`@message`, the Ansible callback's
/// `event`/`host`, ...), nested a few levels.
pub(crate) fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::String),
    ];
    let key = prop_oneof![
        Just("resource_changes".to_string()),
        Just("output_changes".to_string()),
        Just("change".to_string()),
        Just("actions".to_string()),
        Just("address".to_string()),
        Just("type".to_string()),
        Just("before".to_string()),
        Just("after".to_string()),
        Just("@message".to_string()),
        Just("@level".to_string()),
        Just("diagnostic".to_string()),
        Just("hook".to_string()),
        Just("resource".to_string()),
        Just("event".to_string()),
        Just("host".to_string()),
        Just("task".to_string()),
        Just("task_uuid".to_string()),
        Just("hosts".to_string()),
        Just("changed".to_string()),
        Just("duration_s".to_string()),
        "[a-z_@]{1,10}",
    ];
    leaf.prop_recursive(4, 96, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[allow(dead_code)]
/// Lines as tools print them: arbitrary text, or one JSON document.
pub(crate) fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,200}",
        any::<String>(),
        json().prop_map(|v| v.to_string()),
    ]
}
