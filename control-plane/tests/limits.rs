//! The HTTPS server under abuse: a client is authenticated before its body is read, bodies are
//! capped, requests in flight and watches per client are limited (429 with a Retry-After), and
//! what a store failure says stays in the server's log.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Api, ControlPlane, runtime};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

const CONFIGMAPS: &str = "/api/v1/namespaces/default/configmaps";

/// A body that sends its first bytes and then nothing, forever.
fn endless_body() -> reqwest::Body {
    let first = futures::stream::once(async { Ok::<_, std::io::Error>(Bytes::from("{\"a\":")) });
    reqwest::Body::wrap_stream(first.chain(futures::stream::pending()))
}

#[test]
fn the_server_refuses_what_would_exhaust_it() {
    let cp = ControlPlane::start(
        "embedded:{dir}",
        &[
            "--disable-controllers",
            "--max-requests-inflight",
            "2",
            "--max-watches-per-client",
            "3",
        ],
    );
    let api = Api::new(&cp);
    runtime().block_on(async {
        // Without credentials: refused from the headers, the body never waited for.
        let anonymous = api
            .0
            .http
            .post(format!("{}{CONFIGMAPS}", api.0.server))
            .header("content-type", "application/json")
            .body(endless_body())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("an answer before the body ends");
        assert_eq!(anonymous.status().as_u16(), 401);

        // A body over 3 MiB: 413, with a Status that says the limit.
        let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
            "data": {"a": "x".repeat(4 << 20)}});
        let (code, body) = api.call(Method::POST, CONFIGMAPS, Some(big)).await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (413, Some("RequestEntityTooLarge")),
            "{}",
            body["message"]
        );

        // Two requests in flight (each waits for a revision the store will not reach): a
        // third is told to come back, and is served once they are done.
        let (_, list) = api.call(Method::GET, CONFIGMAPS, None).await;
        let rv: i64 = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let future = format!("{CONFIGMAPS}?resourceVersion={}", rv + 1000);
        let slow: Vec<_> = (0..2)
            .map(|_| {
                let request = api.request(Method::GET, &future).send();
                tokio::spawn(request)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy = api.request(Method::GET, CONFIGMAPS).send().await.unwrap();
        assert_eq!(busy.status().as_u16(), 429);
        assert_eq!(
            busy.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let status: Value = busy.json().await.unwrap();
        assert_eq!(status["reason"], "TooManyRequests", "{status}");
        for request in slow {
            let answer = request.await.unwrap().unwrap();
            assert_eq!(
                answer.status().as_u16(),
                504,
                "the future revision never came"
            );
        }
        let (code, _) = api.call(Method::GET, CONFIGMAPS, None).await;
        assert_eq!(code, 200, "served again");

        // Watches: three from this client, not four; one closed makes room.
        let watch = format!("{CONFIGMAPS}?watch=1");
        let mut open = Vec::new();
        for _ in 0..3 {
            let resp = api.request(Method::GET, &watch).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            open.push(resp);
        }
        let refused = api.request(Method::GET, &watch).send().await.unwrap();
        assert_eq!(refused.status().as_u16(), 429);
        drop(open.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let resp = api.request(Method::GET, &watch).send().await.unwrap();
            if resp.status().as_u16() == 200 {
                break;
            }
            // The server counts the closed watch out once it notices the stream is gone.
            assert!(
                tokio::time::Instant::now() < deadline,
                "a closed watch never made room"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Watches are not requests in flight: lists still go through beside them.
        let (code, _) = api.call(Method::GET, CONFIGMAPS, None).await;
        assert_eq!(code, 200);
    });
}
