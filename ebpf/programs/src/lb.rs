//! Backend selection. The kernel only indexes what userspace computed: a service's backends are
//! a contiguous range of `BACKENDS`, its Maglev table a contiguous range of `MAGLEV`.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, Counter, FlowKey, MAGLEV_LANES, SVC_FLAG_AFFINITY,
    SVC_FLAG_MAGLEV, ServiceValue, flow_hash,
};

use crate::{
    maps::{AFFINITY, BACKENDS, MAGLEV},
    stats::count,
};

/// A chosen backend and its index within the service's range.
#[derive(Clone, Copy)]
pub struct Choice {
    pub backend: Backend,
    pub index: u32,
}

/// The backend at `index` of the service's range, if the index is in range.
#[inline(always)]
pub fn backend_at(svc: &ServiceValue, index: u32) -> Option<Backend> {
    if index >= svc.backend_count {
        return None;
    }
    BACKENDS.get(svc.backend_first.wrapping_add(index)).copied()
}

/// Chooses a backend for a new flow of a service with at least one backend: session
/// affinity first, then Maglev or random. `None` if the maps are inconsistent.
#[inline(always)]
pub fn choose(svc: &ServiceValue, flow: &FlowKey) -> Option<Choice> {
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
        // The backend must still sit at its index: a backend that left loses its clients.
        if now.wrapping_sub(entry.last_used_ns) <= timeout_ns
            && backend_at(svc, entry.backend_index) == Some(entry.backend)
        {
            // SAFETY: as above; one field write.
            unsafe { core::ptr::addr_of_mut!((*ptr).last_used_ns).write(now) };
            count(Counter::AffinityHit);
            return Some(Choice {
                backend: entry.backend,
                index: entry.backend_index,
            });
        }
    }
    let choice = choose_fresh(svc, flow)?;
    let entry = AffinityEntry {
        backend: choice.backend,
        backend_index: choice.index,
        _pad: 0,
        last_used_ns: now,
    };
    // Affinity is best effort: a failed insert only means the next flow chooses afresh.
    let _ = AFFINITY.insert(key, entry, 0);
    Some(choice)
}

#[inline(always)]
fn choose_fresh(svc: &ServiceValue, flow: &FlowKey) -> Option<Choice> {
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
    Some(Choice {
        backend: backend_at(svc, index)?,
        index,
    })
}
