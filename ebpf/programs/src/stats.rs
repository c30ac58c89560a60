//! Per-CPU counters: every verdict and every drop reason has one.

use ebpf_common::Counter;

use crate::maps::COUNTERS;

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU, with preemption disabled.
        unsafe { *value += 1 };
    }
}
