//! The Mann-Whitney U test and the Hodges-Lehmann estimate against values
//! scipy and numpy computed (tests/fixtures/judge/reference.py wrote
//! reference.json; rerun it from the set-up virtualenv to refresh them).

use cd_stages::stats::{hodges_lehmann, mann_whitney_u, Method};

#[test]
fn matches_scipy_and_numpy() {
    let text = include_str!("fixtures/judge/reference.json");
    let reference: serde_json::Value = serde_json::from_str(text).unwrap();
    let pairs = reference["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 10);
    let (mut exact, mut asymptotic) = (0, 0);
    for p in pairs {
        let name = p["name"].as_str().unwrap();
        let v = |k: &str| -> Vec<f64> { serde_json::from_value(p[k].clone()).unwrap() };
        let (x, y) = (v("x"), v("y"));
        let r = mann_whitney_u(&x, &y).unwrap();
        let want_u = p["u1"].as_f64().unwrap();
        let want_p = p["p_value"].as_f64().unwrap();
        assert!(
            (r.u1 - want_u).abs() < 1e-9,
            "{name}: U1 {} vs scipy {want_u}",
            r.u1
        );
        assert!(
            (r.p_value - want_p).abs() < 1e-6,
            "{name}: p {} vs scipy {want_p}",
            r.p_value
        );
        match p["method"].as_str().unwrap() {
            "exact" => {
                exact += 1;
                assert_eq!(r.method, Method::Exact, "{name}");
            }
            _ => {
                asymptotic += 1;
                assert_eq!(r.method, Method::Asymptotic, "{name}");
            }
        }
        let hl = hodges_lehmann(&x, &y, 0.98).unwrap();
        let want_hl = p["hodges_lehmann"].as_f64().unwrap();
        assert!(
            (hl.estimate - want_hl).abs() < 1e-9,
            "{name}: Hodges-Lehmann {} vs numpy {want_hl}",
            hl.estimate
        );
        assert!(
            hl.lower <= hl.estimate && hl.estimate <= hl.upper,
            "{name}: {hl:?}"
        );
        assert!(
            hl.lower.is_finite() && hl.upper.is_finite(),
            "{name}: {hl:?}"
        );
    }
    assert!(exact >= 3 && asymptotic >= 3, "both methods covered");
}

#[test]
fn empty_and_nan_samples_are_no_result() {
    assert!(mann_whitney_u(&[], &[1.0]).is_none());
    assert!(mann_whitney_u(&[1.0, f64::NAN], &[1.0]).is_none());
    assert!(hodges_lehmann(&[1.0], &[], 0.98).is_none());
}
