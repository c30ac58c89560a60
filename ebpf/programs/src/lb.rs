//! Backend selection. The kernel only indexes what userspace computed: a service's backends are
//! a contiguous range of `BACKENDS`, its Maglev table a contiguous range of `MAGLEV`.
//!
//! What remembers a backend (a UDP flow, a ClientIP affinity entry, an unconnected socket)
//! remembers its address and checks it against `MEMBERS`, the set of (service, backend) pairs:
//! a backend keeps its clients while it stays in the service, whatever slot it moves to.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, Counter, FlowKey, MAGLEV_LANES, MemberKey,
    SVC_FLAG_AFFINITY, SVC_FLAG_MAGLEV, ServiceValue, flow_hash,
};

use crate::{
    maps::{AFFINITY, BACKENDS, MAGLEV, MEMBERS},
    stats::count,
};

/// The backend at `index` of the service's range, if the index is in range.
#[inline(always)]
fn backend_at(svc: &ServiceValue, index: u32) -> Option<Backend> {
    if index >= svc.backend_count {
        return None;
    }
    BACKENDS.get(svc.backend_first.wrapping_add(index)).copied()
}

/// Whether `backend` is still a backend of the service with id `service_id`.
#[inline(always)]
pub fn still_member(service_id: u32, backend: Backend) -> bool {
    MEMBERS
        .get_ptr(MemberKey {
            service_id,
            backend,
        })
        .is_some()
}

/// Chooses a backend for a new flow of a service with at least one backend: session
/// affinity first, then Maglev or random. `None` if the maps are inconsistent.
#[inline(always)]
pub fn choose(svc: &ServiceValue, flow: &FlowKey) -> Option<Backend> {
    if svc.flags & SVC_FLAG_AFFINITY == 0 {
        return choose_fresh(svc, flow);
    }
    // SAFETY: reading a u64 clock; no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = AffinityKey {
        client: flow.saddr,
        service_id: svc.id,
    };
    if let Some(ptr) = AFFINITY.get_ptr_mut(key) {
        // SAFETY: the pointer comes from a successful lookup; the entry is copied out (other
        // CPUs may use it at the same time) and only its time written back. A concurrent
        // update can only make the values read here stale, which the checks below tolerate.
        let entry = unsafe { ptr.read() };
        let timeout_ns = svc.affinity_timeout_s as u64 * 1_000_000_000;
        // A backend that left the service loses its clients; the others keep theirs.
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns && still_member(svc.id, entry.backend)
        {
            // SAFETY: as above; one field write.
            unsafe { core::ptr::addr_of_mut!((*ptr).last_used_ns).write(now) };
            count(Counter::AffinityHit);
            return Some(entry.backend);
        }
    }
    let backend = choose_fresh(svc, flow)?;
    let entry = AffinityEntry {
        backend,
        last_used_ns: now,
    };
    // Affinity is best effort: a failed insert only means the next flow chooses afresh.
    let _ = AFFINITY.insert(key, entry, 0);
    Some(backend)
}

/// Any backend, uniformly at random (socket-level load balancing, which has no client port
/// to hash yet, and serves Maglev's external frontends to pods that way).
#[inline(always)]
pub fn choose_random(svc: &ServiceValue) -> Option<Backend> {
    // SAFETY: no arguments.
    backend_at(svc, (unsafe { bpf_get_prandom_u32() }) % svc.backend_count)
}

#[inline(always)]
fn choose_fresh(svc: &ServiceValue, flow: &FlowKey) -> Option<Backend> {
    let index = if svc.flags & SVC_FLAG_MAGLEV != 0 && svc.maglev_size != 0 {
        let lane = svc
            .maglev_first
            .wrapping_add(flow_hash(flow.saddr, flow.sport) % svc.maglev_size);
        let lanes = MAGLEV.get(lane / MAGLEV_LANES as u32)?;
        lanes[(lane % MAGLEV_LANES as u32) as usize] as u32
    } else {
        // SAFETY: no arguments.
        (unsafe { bpf_get_prandom_u32() }) % svc.backend_count
    };
    backend_at(svc, index)
}
