//! Objects as the store holds them (JSON) to what the feed carries, through the conversions
//! node agents share (`control_plane_api::convert`). An object that does not decode is skipped.

use control_plane_api::{convert, feed};

pub fn service(json: &[u8]) -> Option<feed::Service> {
    Some(convert::service(&serde_json::from_slice(json).ok()?))
}

pub fn endpoint_slice(json: &[u8]) -> Option<feed::EndpointSlice> {
    Some(convert::endpoint_slice(&serde_json::from_slice(json).ok()?))
}

pub fn node(json: &[u8]) -> Option<feed::Node> {
    Some(convert::node(&serde_json::from_slice(json).ok()?))
}

/// A bound pod and its node; `None` for pods not bound yet.
pub fn pod(json: &[u8]) -> Option<(String, feed::Pod)> {
    convert::pod(&serde_json::from_slice(json).ok()?)
}
