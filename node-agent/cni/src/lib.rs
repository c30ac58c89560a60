//! Pod networking, CNI style. [`plugin`] is `keel-cni`, a plugin any CNI runtime can run
//! (containerd, or this project's kubelet): a veth pair per pod ([`netlink`]), addresses from
//! the node's pod CIDR ([`ipam`]). [`invoke`] is the runtime's side: it runs a plugin exactly as
//! the spec says (environment, configuration on stdin, result or error read back), for keel-cni
//! or any other plugin (Debian's `bridge` + `host-local` in the tests). [`spec`] holds what the
//! two sides share.

pub mod invoke;
pub mod ipam;
pub mod netlink;
pub mod plugin;
pub mod spec;
