//! SUBSCRIBE, decided filter by filter: the ACL, shared subscriptions,
//! the subscription cap; and the SUBACK's reason string.

use std::collections::HashSet;

use rumqttd::protocol::{Filter, RetainForwardRule, SubAckProperties, SubscribeReasonCode};

use super::{Action, Channel, Limits, Now};

/// A filter of a SUBSCRIBE refused.
#[derive(Debug, PartialEq, Eq)]
pub struct FilterRefused {
    pub code: SubscribeReasonCode,
    pub why: String,
    /// Over the subscription cap (counted as a quota refusal).
    pub quota: bool,
}

/// Whether a SUBSCRIBE's filter gets the retained messages it matches
/// (MQTT 5 3.8.3.1 retain handling; 3.1.1 always): `new`, it was not held.
pub fn sends_retained(rule: &RetainForwardRule, new: bool) -> bool {
    match rule {
        RetainForwardRule::OnEverySubscribe => true,
        RetainForwardRule::OnNewSubscribe => new,
        RetainForwardRule::Never => false,
    }
}

/// A share group's filter is what follows `$share/<group>/`.
pub fn share_inner(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

/// A SUBACK's properties: its reason string, if any.
pub fn suback_props(why: Option<String>) -> Option<SubAckProperties> {
    why.map(|why| SubAckProperties {
        reason_string: Some(why),
        user_properties: Vec::new(),
    })
}

impl Channel {
    /// The ACL's answer for each filter, then the subscription cap's (the
    /// session holds `held` filters, `holds` says which): `None` if
    /// allowed, else the refusal's reason code and why.
    pub fn check_filters(
        &self,
        filters: &[Filter],
        mut held: usize,
        holds: impl Fn(&str) -> bool,
        limits: Limits,
    ) -> Vec<Option<FilterRefused>> {
        let max = limits.max_subscriptions;
        let mut seen = HashSet::new();
        let mut room = |f: &str| {
            let new = !holds(f) && seen.insert(f.to_owned());
            let room = !new || max == 0 || held < max;
            held += usize::from(new && room);
            room
        };
        let v5 = self.is_v5();
        let code = |c: SubscribeReasonCode| if v5 { c } else { SubscribeReasonCode::Failure };
        filters
            .iter()
            .map(|f| match self.acl.can_subscribe(&f.path) {
                // rumqttd 0.20's router panics (and refuses every link
                // after) when a persistent session alone in a share group
                // leaves with a QoS 1 delivery not acknowledged: shared
                // subscriptions are for clean sessions only.
                Ok(()) if !self.terms.clean && f.path.starts_with("$share/") => {
                    let why = format!("filter {:?}: shared subscriptions need a clean session", f.path);
                    tracing::warn!(reason = "acl", detail = %crate::printable(&why), "mqtt: subscription refused");
                    Some(FilterRefused {
                        code: code(SubscribeReasonCode::SharedSubscriptionsNotSupported),
                        why,
                        quota: false,
                    })
                }
                Ok(()) if !room(&f.path) => Some(FilterRefused {
                    code: code(SubscribeReasonCode::QuotaExceeded),
                    why: format!(
                        "filter {:?}: this session holds {max} subscriptions, the most allowed",
                        f.path
                    ),
                    quota: true,
                }),
                Ok(()) => None,
                Err(why) => {
                    tracing::warn!(reason = "acl", detail = %crate::printable(&why.to_string()), "mqtt: subscription refused");
                    Some(FilterRefused {
                        code: code(SubscribeReasonCode::NotAuthorized),
                        why: why.0,
                        quota: false,
                    })
                }
            })
            .collect()
    }

    /// Reason codes of refused filters, and one reason string for the
    /// SUBACK (MQTT 5, if the client takes problem information). A refusal
    /// over the cap is counted.
    pub fn refusals(
        &mut self,
        checked: Vec<Option<FilterRefused>>,
        now: Now,
        actions: &mut Vec<Action>,
    ) -> (Vec<Option<SubscribeReasonCode>>, Option<String>) {
        let mut whys = Vec::new();
        let mut quota = None;
        let codes = checked
            .into_iter()
            .map(|c| {
                c.map(|r| {
                    if r.quota && quota.is_none() {
                        quota = Some(r.why.clone());
                    }
                    whys.push(r.why);
                    r.code
                })
            })
            .collect();
        if let Some(why) = quota {
            self.over_quota(&why, now, actions);
        }
        let why =
            (!whys.is_empty() && self.is_v5() && self.terms.problem_info).then(|| whys.join("; "));
        (codes, why)
    }
}
