//! The pod-resources source: which devices (GPUs, MIG instances) each container holds, from
//! the kubelet's pod-resources API — gRPC `v1.PodResourcesLister/List` over the unix socket
//! `/var/lib/kubelet/pod-resources/kubelet.sock`.
//!
//! The call is one unary gRPC request over HTTP/2 (the `h2` crate), the messages declared here
//! with `prost` (only the fields read; unknown fields are skipped by protobuf itself), so no
//! code generation and no `protoc` at build time. NVIDIA's device plugin reports GPUs as
//! `nvidia.com/gpu` and, with the mixed MIG strategy, MIG instances as
//! `nvidia.com/mig-<profile>`; device ids are the GPU or MIG UUIDs.
//!
//! GPUs handed out through Dynamic Resource Allocation are in each container's
//! `dynamic_resources` (the kubelet's `KubeletPodResourcesDynamicResources` feature, on by
//! default since Kubernetes 1.34): per claim, the driver (`gpu.nvidia.com`), its pool (the node)
//! and the device's name in the driver's ResourceSlice (`gpu-0`, `gpu-0-mig-19-0-1`). Such a
//! row is an [`Assignment`] with `dra` set and device ids `POOL/DEVICE`; what the device is
//! (its UUID, model and MIG profile) comes from the ResourceSlices (the kubelet source's
//! `resource_slices_url`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Deserialize;

use super::SourceError;

/// Where the kubelet's pod-resources socket is.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PodResourcesConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    /// Resource names counted as GPUs: exact names, or prefixes ending in `*`.
    pub gpu_resources: Vec<String>,
    /// DRA drivers whose devices are GPUs (their claims' devices are billed as GPUs).
    pub dra_drivers: Vec<String>,
}

impl Default for PodResourcesConfig {
    fn default() -> Self {
        PodResourcesConfig {
            enabled: false,
            socket: "/var/lib/kubelet/pod-resources/kubelet.sock".into(),
            gpu_resources: vec!["nvidia.com/gpu".into(), "nvidia.com/mig-*".into()],
            dra_drivers: vec!["gpu.nvidia.com".into()],
        }
    }
}

/// The devices one container holds of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// The device plugin's resource name, or the DRA driver's name.
    pub resource: String,
    /// The device plugin's device ids (GPU and MIG UUIDs), or for DRA `POOL/DEVICE`.
    pub device_ids: Vec<String>,
    /// Allocated through a DRA claim (`resource` is the driver).
    pub dra: bool,
}

impl Assignment {
    /// The MIG profile named by the resource (`nvidia.com/mig-1g.10gb` → `1g.10gb`); empty
    /// for whole GPUs and for the single MIG strategy (where NVML names the profile).
    pub fn mig_profile(&self) -> &str {
        if self.dra {
            return "";
        }
        mig_profile_of(&self.resource)
    }
}

/// The MIG profile a device plugin's resource names (`nvidia.com/mig-1g.10gb` → `1g.10gb`);
/// empty for whole GPUs.
pub fn mig_profile_of(resource: &str) -> &str {
    resource
        .rsplit_once("/mig-")
        .map(|(_, profile)| profile)
        .unwrap_or("")
}

/// Whether `resource` is one of the configured GPU resources.
pub fn is_gpu(patterns: &[String], resource: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => resource.starts_with(prefix),
        None => resource == p,
    })
}

/// The protobuf messages of `k8s.io/kubelet/pkg/apis/podresources/v1/api.proto`, as read.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListPodResourcesResponse {
        #[prost(message, repeated, tag = "1")]
        pub pod_resources: Vec<PodResources>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PodResources {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(message, repeated, tag = "3")]
        pub containers: Vec<ContainerResources>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerResources {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub devices: Vec<ContainerDevices>,
        #[prost(message, repeated, tag = "5")]
        pub dynamic_resources: Vec<DynamicResource>,
    }

    /// The devices a DRA claim gave a container.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DynamicResource {
        #[prost(string, tag = "2")]
        pub claim_name: String,
        #[prost(string, tag = "3")]
        pub claim_namespace: String,
        #[prost(message, repeated, tag = "4")]
        pub claim_resources: Vec<ClaimResource>,
    }

    /// One device of a claim, as its driver's ResourceSlice names it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ClaimResource {
        #[prost(message, repeated, tag = "1")]
        pub cdi_devices: Vec<CdiDevice>,
        #[prost(string, tag = "2")]
        pub driver_name: String,
        #[prost(string, tag = "3")]
        pub pool_name: String,
        #[prost(string, tag = "4")]
        pub device_name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CdiDevice {
        #[prost(string, tag = "1")]
        pub name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ContainerDevices {
        #[prost(string, tag = "1")]
        pub resource_name: String,
        #[prost(string, repeated, tag = "2")]
        pub device_ids: Vec<String>,
    }
}

/// The gRPC method called.
pub const LIST: &str = "/v1.PodResourcesLister/List";

/// A gRPC message frame: uncompressed flag, big-endian length, the message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The message of the one frame in `body`.
fn unframe(mut body: Bytes) -> Result<Bytes, String> {
    if body.len() < 5 {
        return Err(format!(
            "a gRPC answer of {} bytes has no frame",
            body.len()
        ));
    }
    if body.get_u8() != 0 {
        return Err("a compressed gRPC answer (none was asked for)".into());
    }
    let len = body.get_u32() as usize;
    if body.len() < len {
        return Err(format!(
            "a gRPC frame of {len} bytes with {} received",
            body.len()
        ));
    }
    Ok(body.split_to(len))
}

/// Asks the kubelet at `socket` which devices every container holds.
pub async fn list(socket: &Path) -> Result<Vec<Assignment>, SourceError> {
    let failed = |what: String| SourceError::Failed(format!("{}: {what}", socket.display()));
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| failed(format!("cannot connect ({e}); is the kubelet's pod-resources socket mounted into the agent?")))?;
        // Windows large enough for a dense node's whole answer in one go.
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(4 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| failed(format!("HTTP/2 handshake: {e}")))?;
        let driver = tokio::spawn(connection);
        let mut client = client
            .ready()
            .await
            .map_err(|e| failed(format!("HTTP/2: {e}")))?;
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{LIST}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(|e| failed(e.to_string()))?;
        let (answer, mut send) = client
            .send_request(request, false)
            .map_err(|e| failed(format!("HTTP/2: {e}")))?;
        send.send_data(frame(&[]), true)
            .map_err(|e| failed(format!("HTTP/2: {e}")))?;
        let answer = answer.await.map_err(|e| failed(format!("HTTP/2: {e}")))?;
        let (head, mut body) = answer.into_parts();
        let mut received = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| failed(format!("HTTP/2: {e}")))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
        }
        // gRPC puts its status in the trailers, or in the head of a trailers-only answer.
        let trailers = body
            .trailers()
            .await
            .map_err(|e| failed(format!("HTTP/2: {e}")))?;
        driver.abort();
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or(head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("missing");
        if status != "0" {
            let message = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-message"))
                .or(head.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            return Err(failed(format!(
                "{LIST} answered gRPC status {status} {message}"
            )));
        }
        let message = unframe(received.freeze()).map_err(failed)?;
        let response = <proto::ListPodResourcesResponse as prost::Message>::decode(message)
            .map_err(|e| failed(format!("undecodable answer: {e}")))?;
        Ok(assignments(response))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| failed("no answer in 5 s".into()))?
}

/// The pod-resources API as a source: yields the GPU assignments, no readings.
pub struct PodResourcesSource {
    config: PodResourcesConfig,
}

impl PodResourcesSource {
    pub fn new(config: PodResourcesConfig) -> Self {
        PodResourcesSource { config }
    }
}

impl super::Source for PodResourcesSource {
    fn name(&self) -> &str {
        "pod_resources"
    }

    fn metrics(&self) -> Vec<String> {
        Vec::new()
    }

    fn collect(&mut self) -> super::BoxFuture<'_, Result<super::Collected, SourceError>> {
        Box::pin(async move {
            let mut rows = list(&self.config.socket).await?;
            rows.retain(|r| {
                if r.dra {
                    self.config.dra_drivers.contains(&r.resource)
                } else {
                    is_gpu(&self.config.gpu_resources, &r.resource)
                }
            });
            Ok(super::Collected {
                assignments: Some(rows),
                ..Default::default()
            })
        })
    }
}

/// Flattens a List answer into one row per container and resource (and per container and DRA
/// driver).
pub fn assignments(response: proto::ListPodResourcesResponse) -> Vec<Assignment> {
    let mut out = Vec::new();
    for pod in response.pod_resources {
        for container in pod.containers {
            let row = |resource: String, device_ids: Vec<String>, dra: bool| Assignment {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: container.name.clone(),
                resource,
                device_ids,
                dra,
            };
            for devices in &container.devices {
                out.push(row(
                    devices.resource_name.clone(),
                    devices.device_ids.clone(),
                    false,
                ));
            }
            let mut by_driver: std::collections::BTreeMap<&str, Vec<String>> =
                std::collections::BTreeMap::new();
            for claimed in container
                .dynamic_resources
                .iter()
                .flat_map(|d| &d.claim_resources)
            {
                by_driver
                    .entry(&claimed.driver_name)
                    .or_default()
                    .push(format!("{}/{}", claimed.pool_name, claimed.device_name));
            }
            for (driver, devices) in by_driver {
                out.push(row(driver.to_string(), devices, true));
            }
        }
    }
    out
}

/// A stand-in for the kubelet's pod-resources socket, for tests and benchmarks.
pub mod fake {
    use std::path::PathBuf;

    use super::{LIST, frame, proto::ListPodResourcesResponse};

    /// Serves `List` on a unix socket like the kubelet: each call gets `answer` (a response
    /// message, or a gRPC status code and message).
    pub async fn serve(
        socket: PathBuf,
        answer: Result<ListPodResourcesResponse, (u32, &'static str)>,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::UnixListener::bind(&socket)?;
        Ok(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    // Each call answered in its own task while this one drives the connection.
                    while let Some(Ok((request, respond))) = conn.accept().await {
                        if request.uri().path() == LIST {
                            let answer = answer.clone();
                            tokio::spawn(async move {
                                let _ = reply(request, respond, &answer).await;
                            });
                        }
                    }
                });
            }
        }))
    }

    async fn reply(
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<bytes::Bytes>,
        answer: &Result<ListPodResourcesResponse, (u32, &'static str)>,
    ) -> Result<(), h2::Error> {
        let mut body = request.into_body();
        while let Some(chunk) = body.data().await {
            chunk?;
        }
        let head = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap_or_default();
        let mut send = respond.send_response(head, false)?;
        let mut trailers = http::HeaderMap::new();
        let status = match answer {
            Ok(response) => {
                send.send_data(frame(&prost::Message::encode_to_vec(response)), false)?;
                "0".to_string()
            }
            Err((code, message)) => {
                if let Ok(message) = message.parse() {
                    trailers.insert("grpc-message", message);
                }
                code.to_string()
            }
        };
        if let Ok(status) = status.parse() {
            trailers.insert("grpc-status", status);
        }
        send.send_trailers(trailers)
    }
}

#[cfg(test)]
pub mod tests {
    use super::fake::serve;
    use super::proto::*;
    use super::*;

    /// A kubelet's answer: one pod with two whole H100s, one with a MIG instance, one with
    /// only CPUs.
    pub fn fixture() -> ListPodResourcesResponse {
        let devices = |resource: &str, ids: &[&str]| ContainerDevices {
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        ListPodResourcesResponse {
            pod_resources: vec![
                PodResources {
                    name: "web-6d4cf56db6-x7k2p".into(),
                    namespace: "4pv7q2k0dl8r1ls3r1hmp7n0uc0fh0b5q4dqm0m4vq8c6".into(),
                    containers: vec![ContainerResources {
                        name: "web".into(),
                        devices: vec![devices(
                            "nvidia.com/gpu",
                            &["GPU-11111111-aaaa", "GPU-22222222-bbbb"],
                        )],
                        dynamic_resources: vec![],
                    }],
                },
                PodResources {
                    name: "train-42-8xq4d".into(),
                    namespace: "research".into(),
                    containers: vec![ContainerResources {
                        name: "trainer".into(),
                        devices: vec![devices("nvidia.com/mig-1g.10gb", &["MIG-33333333-cccc"])],
                        dynamic_resources: vec![],
                    }],
                },
                PodResources {
                    name: "lonely".into(),
                    namespace: "research".into(),
                    containers: vec![ContainerResources {
                        name: "main".into(),
                        devices: vec![],
                        dynamic_resources: vec![],
                    }],
                },
            ],
        }
    }

    /// A pod whose container got a whole GPU and a MIG device through DRA claims (NVIDIA's
    /// driver, its pool named after the node), and a network device from another driver.
    pub fn dra_fixture() -> ListPodResourcesResponse {
        let claimed = |driver: &str, device: &str| ClaimResource {
            cdi_devices: vec![CdiDevice {
                name: format!("k8s.{driver}/claim=0f4e2a1c-{device}"),
            }],
            driver_name: driver.into(),
            pool_name: "gpu-node-1".into(),
            device_name: device.into(),
        };
        ListPodResourcesResponse {
            pod_resources: vec![PodResources {
                name: "infer-0".into(),
                namespace: "research".into(),
                containers: vec![ContainerResources {
                    name: "server".into(),
                    devices: vec![],
                    dynamic_resources: vec![
                        DynamicResource {
                            claim_name: "infer-0-gpu-x8k2m".into(),
                            claim_namespace: "research".into(),
                            claim_resources: vec![claimed("gpu.nvidia.com", "gpu-1")],
                        },
                        DynamicResource {
                            claim_name: "infer-0-mig-p2d7q".into(),
                            claim_namespace: "research".into(),
                            claim_resources: vec![
                                claimed("gpu.nvidia.com", "gpu-3-mig-19-0-1"),
                                claimed("dra.net", "eth1"),
                            ],
                        },
                    ],
                }],
            }],
        }
    }

    #[tokio::test]
    async fn dra_claims_are_read_per_driver_and_other_drivers_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let server = serve(socket.clone(), Ok(dra_fixture()))
            .await
            .expect("fake socket");
        let rows = list(&socket).await.expect("answered");
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            rows[1],
            Assignment {
                namespace: "research".into(),
                pod: "infer-0".into(),
                container: "server".into(),
                resource: "gpu.nvidia.com".into(),
                device_ids: vec![
                    "gpu-node-1/gpu-1".into(),
                    "gpu-node-1/gpu-3-mig-19-0-1".into()
                ],
                dra: true,
            }
        );
        assert_eq!(rows[1].mig_profile(), "");
        let mut source = PodResourcesSource::new(PodResourcesConfig {
            enabled: true,
            socket,
            ..Default::default()
        });
        let collected = super::super::Source::collect(&mut source)
            .await
            .expect("collects");
        let kept = collected.assignments.expect("assignments");
        assert_eq!(
            kept.len(),
            1,
            "the network driver's device is not a GPU: {kept:?}"
        );
        assert_eq!(kept[0].resource, "gpu.nvidia.com");
        server.abort();
    }

    #[tokio::test]
    async fn the_list_call_reads_every_containers_devices_over_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let server = serve(socket.clone(), Ok(fixture()))
            .await
            .expect("fake socket");
        let rows = list(&socket).await.expect("answered");
        assert_eq!(rows.len(), 2, "the CPU-only container holds no devices");
        assert_eq!(rows[0].container, "web");
        assert_eq!(
            rows[0].device_ids,
            ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
        );
        assert_eq!(rows[0].mig_profile(), "");
        assert_eq!(rows[1].namespace, "research");
        assert_eq!(rows[1].mig_profile(), "1g.10gb");
        let patterns = PodResourcesConfig::default().gpu_resources;
        assert!(rows.iter().all(|r| is_gpu(&patterns, &r.resource)));
        assert!(!is_gpu(&patterns, "amd.com/gpu"));
        assert!(!is_gpu(&patterns, "nvidia.com/gpu.shared"));
        server.abort();
    }

    #[tokio::test]
    async fn errors_say_where_and_what() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("kubelet.sock");
        let e = list(&socket).await.expect_err("no socket").to_string();
        assert!(e.contains("kubelet.sock: cannot connect"), "{e}");
        assert!(e.contains("mounted into the agent"), "{e}");

        let server = serve(socket.clone(), Err((12, "unknown service")))
            .await
            .expect("fake socket");
        let e = list(&socket).await.expect_err("unimplemented").to_string();
        assert!(e.contains("gRPC status 12 unknown service"), "{e}");
        server.abort();
    }

    #[test]
    fn frames_round_trip_and_short_frames_are_errors() {
        let f = frame(b"abc");
        assert_eq!(&f[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(&unframe(f.clone()).expect("whole")[..], b"abc");
        assert!(unframe(f.slice(..6)).is_err());
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
    }
}
