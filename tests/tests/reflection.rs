//! gRPC reflection on the real servers, in both protocol versions: each lists
//! its own service, health and reflection — never the other twokey services —
//! so standard tools (grpcurl, grpcio's client) see what the server serves.

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_reflection::pb::{v1, v1alpha};
use twokey_e2e::{System, bounded};

/// `async fn $name(channel) -> Vec<String>`: the services `ListServices`
/// names over reflection version `$v` (`v1` or `v1alpha`), sorted. The two
/// versions are the same protocol in two packages.
macro_rules! list_services {
    ($name:ident, $v:ident) => {
        async fn $name(channel: Channel) -> Vec<String> {
            use $v::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let request = $v::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut answers = bounded(
                ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::once(request)),
            )
            .await
            .expect("reflection answers");
            let answer = answers.next().await.expect("one answer").expect("no error");
            let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
                panic!("not a service list: {answer:?}");
            };
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
    };
}

list_services!(services_v1, v1);
list_services!(services_v1alpha, v1alpha);

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
