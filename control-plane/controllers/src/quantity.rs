//! Resource quantities ("100m", "1.5", "128Mi", "2e3") as the scheduler counts them: CPU in
//! millicores, everything else in units (bytes for memory), rounded up.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::api::resource::Quantity};

/// A quantity's value in thousandths of its unit (millicores for CPU), rounded up; `None` if
/// it does not parse or is negative.
pub fn milli(q: &str) -> Option<i64> {
    let value = kube_quantity::ParsedQuantity::try_from(q.trim())
        .ok()?
        .to_bytes_f64()?;
    // Through billionths, the finest a quantity expresses, so binary floating point does not
    // round `1.1` up to 1101 millis.
    let milli = ((value * 1e9).round() / 1e6).ceil();
    (milli.is_finite() && milli >= 0.0).then_some(milli.min(i64::MAX as f64) as i64)
}

/// CPU in millicores.
pub fn cpu_millis(q: &Quantity) -> i64 {
    milli(&q.0).unwrap_or(0)
}

/// A count of units (bytes, pods), rounded up.
pub fn units(q: &Quantity) -> i64 {
    milli(&q.0).map(|m| (m + 999) / 1000).unwrap_or(0)
}

/// What a pod or a node has, in the units the scheduler counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: i64,
    pub memory: i64,
    pub pods: i64,
}

impl Resources {
    pub fn from_list(list: Option<&BTreeMap<String, Quantity>>) -> Self {
        let get = |k: &str| list.and_then(|l| l.get(k));
        Self {
            cpu_millis: get("cpu").map(cpu_millis).unwrap_or(0),
            memory: get("memory").map(units).unwrap_or(0),
            pods: get("pods").map(units).unwrap_or(0),
        }
    }

    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis += other.cpu_millis;
        self.memory += other.memory;
        self.pods += other.pods;
    }

    pub fn sub(&mut self, other: &Resources) {
        self.cpu_millis -= other.cpu_millis;
        self.memory -= other.memory;
        self.pods -= other.pods;
    }

    fn max(self, other: Resources) -> Self {
        Self {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory: self.memory.max(other.memory),
            pods: self.pods.max(other.pods),
        }
    }
}

/// Defaults the scheduler's scoring assumes for containers that request nothing (as
/// kube-scheduler's "non-zero" requests): 100m CPU, 200 MiB.
const DEFAULT_CPU_MILLIS: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// A pod's requests as kube-scheduler computes them: the sum over its containers, at least the
/// largest init container, plus its overhead; `pods` is 1. The second value counts containers
/// without requests at the scoring defaults.
pub fn pod_requests(pod: &Pod) -> (Resources, Resources) {
    let Some(spec) = &pod.spec else {
        return (Resources::default(), Resources::default());
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        Resources::from_list(c.resources.as_ref().and_then(|r| r.requests.as_ref()))
    };
    let mut sum = Resources::default();
    let mut nonzero = Resources::default();
    for c in &spec.containers {
        let r = of(c);
        sum.add(&r);
        nonzero.add(&Resources {
            cpu_millis: if r.cpu_millis == 0 {
                DEFAULT_CPU_MILLIS
            } else {
                r.cpu_millis
            },
            memory: if r.memory == 0 {
                DEFAULT_MEMORY
            } else {
                r.memory
            },
            pods: 0,
        });
    }
    for c in spec.init_containers.iter().flatten() {
        sum = sum.max(of(c));
        nonzero = nonzero.max(of(c));
    }
    let overhead = Resources::from_list(spec.overhead.as_ref());
    sum.add(&overhead);
    nonzero.add(&overhead);
    sum.pods = 1;
    nonzero.pods = 1;
    (sum, nonzero)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_in_every_notation() {
        assert_eq!(milli("100m"), Some(100));
        assert_eq!(milli("1.5"), Some(1500));
        assert_eq!(milli("1.1"), Some(1100));
        assert_eq!(milli("-1"), None);
        assert_eq!(milli("2"), Some(2000));
        assert_eq!(milli("128Mi"), Some(128 * 1024 * 1024 * 1000));
        assert_eq!(milli("1G"), Some(1_000_000_000_000));
        assert_eq!(milli("2e3"), Some(2_000_000));
        assert_eq!(milli("1n"), Some(1), "rounded up");
        assert_eq!(milli("lots"), None);
        assert_eq!(units(&Quantity("110".into())), 110);
        assert_eq!(units(&Quantity("1Ki".into())), 1024);
    }
}
