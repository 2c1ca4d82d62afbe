use super::*;

#[test]
fn retain_handling_decides_who_gets_retained_messages() {
    // MQTT 5 3.8.3.1: 0 always, 1 only for a new subscription, 2 never.
    assert!(sends_retained(&RetainForwardRule::OnEverySubscribe, false));
    assert!(sends_retained(&RetainForwardRule::OnNewSubscribe, true));
    assert!(!sends_retained(&RetainForwardRule::OnNewSubscribe, false));
    assert!(!sends_retained(&RetainForwardRule::Never, true));
}

#[test]
fn a_share_group_filter_is_what_follows_its_group() {
    assert_eq!(
        share_inner("$share/g1/devices/+/telemetry"),
        "devices/+/telemetry"
    );
    assert_eq!(share_inner("devices/#"), "devices/#");
    // A malformed share (no filter after the group) is the group's rest.
    assert_eq!(share_inner("$share/g1"), "g1");
}

#[test]
fn a_suback_says_why_only_when_there_is_a_why() {
    assert!(suback_props(None).is_none());
    let p = suback_props(Some("max 1 subscription".into())).unwrap();
    assert_eq!(p.reason_string.as_deref(), Some("max 1 subscription"));
    assert!(p.user_properties.is_empty());
}
