//! gRPC reflection on the real servers, in both protocol versions: each lists
//! its own service, health and reflection — never the other twokey services —
//! so standard tools (grpcurl, grpcio's client) see what the server serves.

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_reflection::pb::{v1, v1alpha};
use twokey_e2e::{System, bounded};

/// The services `ListServices` names over reflection v1.
async fn services_v1(channel: Channel) -> Vec<String> {
    use v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = bounded(
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::once(request)),
    )
    .await
    .expect("reflection v1 answers");
    let answer = answers.next().await.expect("one answer").expect("no error");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

/// The same over reflection v1alpha.
async fn services_v1alpha(channel: Channel) -> Vec<String> {
    use v1alpha::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = bounded(
        ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::once(request)),
    )
    .await
    .expect("reflection v1alpha answers");
    let answer = answers.next().await.expect("one answer").expect("no error");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    names
}

#[tokio::test]
async fn each_server_reflects_only_its_own_service_in_v1_and_v1alpha() {
    let sys = System::start();
    // (service, an identity it lets in, its gRPC service)
    for (service, user, own) in [
        ("vault", "broker", "twokey.vault.v1.VaultService"),
        ("broker", "alice", "twokey.broker.v1.BrokerService"),
        ("audit", "carol", "twokey.audit.v1.AuditService"),
    ] {
        let v1 = services_v1(sys.channel(user, service)).await;
        assert_eq!(
            v1,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                own
            ],
            "{service} over reflection v1"
        );
        let v1alpha = services_v1alpha(sys.channel(user, service)).await;
        assert_eq!(
            v1alpha,
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                own
            ],
            "{service} over reflection v1alpha"
        );
    }
}
