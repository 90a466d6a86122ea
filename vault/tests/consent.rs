//! The people's signed consent, enforced by the vault itself over real mTLS
//! on loopback: the allowed path releases a code; each single compromise
//! (the broker's grant key alone, with one approver's key, one person under
//! two SPIFFE IDs, one admin, a replayed policy or release, a foreign key or
//! namespace) is refused with its exact status, releases nothing and leaves
//! a refusal in the audit log; codes per request and the release rate hold
//! across restarts; disabled accounts release nothing; a replaced or
//! removed seed comes back within its window; a tampered policy chain keeps
//! the vault from starting.

mod common;

use common::*;
use tonic::Code;
use twokey_consent::{
    AdminAction, SignedStatement, approval_binding, new_id, request_binding, sshsig,
};
use twokey_proto::{
    audit::v1::Event,
    vault::v1::{
        EnrollRequest, GenerateCodeRequest, GetPolicyRequest, GrantPurpose, ListAccountsRequest,
        ReleaseEvidence, RemoveAccountRequest, RestoreAccountRequest, SetAccountEnabledRequest,
        enroll_request::Seed, vault_service_client::VaultServiceClient,
    },
};
use twokey_testkit::consent::{AccountRoles, PolicySpec};

const OLD_SECRET: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";
const NEW_SECRET: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

struct Env {
    fx: Fixture,
    audit: FakeAudit,
    audit_server: Running,
    vault: Option<Running>,
}

impl Env {
    /// A vault with policy version 1 listing `accounts` (unless empty) and
    /// `aws-prod-root` enrolled with OLD_SECRET, 30 s steps.
    async fn new(accounts: &[&str]) -> Self {
        let fx = Fixture::new();
        let audit = FakeAudit::default();
        let audit_server = start_fake_audit(&fx, audit.clone()).await;
        let vault = start_vault(fx.vault_config(audit_server.addr)).await;
        let env = Self {
            fx,
            audit,
            audit_server,
            vault: Some(vault),
        };
        if !accounts.is_empty() {
            env.fx.apply(env.addr(), 1, accounts).await;
        }
        env.enroll("aws-prod-root", OLD_SECRET, 30).await;
        env
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.vault.as_ref().expect("the vault runs").addr
    }

    fn client(&self) -> VaultServiceClient<tonic::transport::Channel> {
        self.fx.broker_client(self.addr())
    }

    async fn enroll(&self, account: &str, secret: &str, period: u32) {
        self.client()
            .enroll(EnrollRequest {
                account_id: account.into(),
                seed: Some(Seed::Base32Secret(secret.into())),
                period,
                grant: Some(self.fx.enroll_grant(account, "adam")),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn stop(&mut self) {
        if let Some(vault) = self.vault.take() {
            vault.stop().await;
        }
    }

    /// Stops the vault and starts it again on the same data.
    async fn restart(&mut self) {
        self.stop().await;
        self.vault = Some(start_vault(self.fx.vault_config(self.audit_server.addr)).await);
    }

    async fn release(&self, request: GenerateCodeRequest) -> Result<String, tonic::Status> {
        self.client()
            .generate_code(request)
            .await
            .map(|r| r.into_inner().code.unwrap().code)
    }

    /// Releases, waiting (bounded) while every step up to two ahead is
    /// spent (UNAVAILABLE, which spends nothing).
    async fn release_when_a_step_is_free(
        &self,
        request: GenerateCodeRequest,
    ) -> Result<twokey_proto::types::v1::Code, tonic::Status> {
        for _ in 0..40 {
            match self.client().generate_code(request.clone()).await {
                Err(e) if e.code() == Code::Unavailable && e.message().contains("try again") => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                other => return other.map(|r| r.into_inner().code.unwrap()),
            }
        }
        panic!("no step came free");
    }

    fn events(&self) -> Vec<Event> {
        self.audit.events.lock().unwrap().clone()
    }

    /// The release `request` is refused as `code` saying `says`: no code,
    /// a `code.refused` event for its grant naming why, and no
    /// `code.released` for it.
    async fn refused(&self, request: GenerateCodeRequest, code: Code, says: &str) -> Event {
        let grant_id = grant_id(&request);
        let released = |events: Vec<Event>| {
            events
                .iter()
                .filter(|e| {
                    e.action == "code.released" && e.attributes.get("grant_id") == Some(&grant_id)
                })
                .count()
        };
        let before = released(self.events());
        let refusals_before = self
            .events()
            .iter()
            .filter(|e| e.action == "code.refused")
            .count();
        let err = self.release(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
        let event = stored_event(&self.audit, |e| {
            e.action == "code.refused"
                && e.attributes.get("grant_id") == Some(&grant_id)
                && e.attributes.get("reason").map(String::as_str) == Some(err.message())
        })
        .await;
        assert_eq!(event.actor, format!("spiffe://{TD}/svc/broker"));
        let refusals = self
            .events()
            .iter()
            .filter(|e| e.action == "code.refused")
            .count();
        assert_eq!(refusals, refusals_before + 1);
        assert_eq!(released(self.events()), before, "a code was released");
        event
    }

    /// adam's and anna's consent (or only `admins`') to `action`.
    fn consent(
        &self,
        account: &str,
        action: AdminAction,
        admins: &[&twokey_testkit::consent::Person],
    ) -> twokey_proto::vault::v1::AdminConsent {
        self.fx.admin_consent(1, account, action, admins)
    }

    fn admins(&self) -> [&twokey_testkit::consent::Person; 2] {
        [&self.fx.people.adam, &self.fx.people.anna]
    }

    async fn account(&self, id: &str) -> Option<twokey_proto::types::v1::Account> {
        self.client()
            .list_accounts(ListAccountsRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts
            .into_iter()
            .find(|a| a.account_id == id)
    }
}

fn grant_id(request: &GenerateCodeRequest) -> String {
    use prost::Message;
    twokey_proto::vault::v1::Grant::decode(request.grant.as_ref().unwrap().grant.as_slice())
        .unwrap()
        .grant_id
}

/// A release request carrying `grant` and `evidence`.
fn request(
    grant: twokey_proto::vault::v1::SignedGrant,
    evidence: Option<ReleaseEvidence>,
) -> GenerateCodeRequest {
    GenerateCodeRequest {
        grant: Some(grant),
        evidence,
    }
}

#[tokio::test]
async fn the_allowed_path_releases_a_code_and_names_only_verified_people() {
    let env = Env::new(&["aws-prod-root"]).await;
    let release = env.fx.consented("aws-prod-root", 1);
    let code = env
        .client()
        .generate_code(release.request())
        .await
        .unwrap()
        .into_inner()
        .code
        .unwrap();
    assert_eq!(code.code, code_of(OLD_SECRET, code.step));
    let grant_id = grant_id(&release.request());
    let event = stored_event(&env.audit, |e| e.action == "code.released").await;
    assert_eq!(event.actor, user("olivia"));
    assert_eq!(event.attributes["grant_id"], grant_id);
    assert_eq!(event.attributes["requester"], user("alice"));
    assert_eq!(event.attributes["filed_by"], user("alice"));
    assert_eq!(event.attributes["approvers"], user("bob"));
    assert_eq!(event.attributes["policy_version"], "1");
    assert_eq!(event.attributes["codes_released"], "1 of 1");
    assert!(!event.attributes["release_id"].is_empty());
}

#[tokio::test]
async fn single_compromises_release_nothing_and_are_audited() {
    let env = Env::new(&["aws-prod-root"]).await;
    let fx = &env.fx;
    let p = &fx.people;
    let account = "aws-prod-root";
    let fresh_grant = |request_id: &str| fx.release_grant(account, request_id, &new_id());

    // The broker's grant key alone: no evidence at all.
    let event = env
        .refused(
            request(fresh_grant(&new_id()), None),
            Code::PermissionDenied,
            "the request statement is missing",
        )
        .await;
    assert_eq!(event.attributes["statement"], "the request statement");

    // ...or evidence whose statements are empty.
    let empty = ReleaseEvidence {
        request: Some(SignedStatement::default()),
        approvals: vec![SignedStatement::default()],
        release: Some(SignedStatement::default()),
    };
    env.refused(
        request(fresh_grant(&new_id()), Some(empty)),
        Code::PermissionDenied,
        "the request statement is missing",
    )
    .await;

    // ...or statements in the people's names, signed with a key the policy
    // does not list.
    let forger = twokey_testkit::consent::generate_key();
    let forged = |signer: &str, grant_id: &str, request_id: &str| {
        let request = signed(
            &forger,
            &user("alice"),
            1,
            request_binding(
                request_id,
                account,
                &user("alice"),
                "why",
                "",
                std::time::SystemTime::now(),
            ),
        );
        let approvals = vec![signed(
            &forger,
            &user("bob"),
            1,
            approval_binding(&request).unwrap(),
        )];
        let release = signed(
            &forger,
            &user(signer),
            1,
            twokey_consent::release_binding(&request, &approvals, grant_id, &new_id()).unwrap(),
        );
        ReleaseEvidence {
            request: Some(request),
            approvals,
            release: Some(release),
        }
    };
    let (request_id, gid) = (new_id(), new_id());
    let event = env
        .refused(
            request(
                fx.release_grant(account, &request_id, &gid),
                Some(forged("olivia", &gid, &request_id)),
            ),
            Code::PermissionDenied,
            "in no person's entry of the policy",
        )
        .await;
    assert_eq!(event.attributes["signer"], user("alice"));

    // The broker's key plus one approver's key: bob signs his approval and
    // forges the requester's and the operator's statements with his key.
    let (request_id, gid) = (new_id(), new_id());
    let req = signed(
        &p.bob.key,
        &user("alice"),
        1,
        request_binding(
            &request_id,
            account,
            &user("alice"),
            "why",
            "",
            std::time::SystemTime::now(),
        ),
    );
    let approvals = vec![by(&p.bob, 1, approval_binding(&req).unwrap())];
    let release = signed(
        &p.bob.key,
        &user("olivia"),
        1,
        twokey_consent::release_binding(&req, &approvals, &gid, &new_id()).unwrap(),
    );
    env.refused(
        request(
            fx.release_grant(account, &request_id, &gid),
            Some(ReleaseEvidence {
                request: Some(req.clone()),
                approvals: approvals.clone(),
                release: Some(release),
            }),
        ),
        Code::PermissionDenied,
        "is person bob's",
    )
    .await;
    // ...and bob as requester, approver and operator under his own name.
    let own_req = by(
        &p.bob,
        1,
        request_binding(
            &request_id,
            account,
            &user("bob"),
            "why",
            "",
            std::time::SystemTime::now(),
        ),
    );
    let own_approvals = vec![by(&p.bob, 1, approval_binding(&own_req).unwrap())];
    let gid = new_id();
    let own_release = by(
        &p.bob,
        1,
        twokey_consent::release_binding(&own_req, &own_approvals, &gid, &new_id()).unwrap(),
    );
    env.refused(
        request(
            fx.release_grant(account, &request_id, &gid),
            Some(ReleaseEvidence {
                request: Some(own_req),
                approvals: own_approvals,
                release: Some(own_release),
            }),
        ),
        Code::PermissionDenied,
        "is not requester of account aws-prod-root",
    )
    .await;

    // A statement signed under another namespace.
    let (request_id, gid) = (new_id(), new_id());
    let mut evidence = fx.evidence_for(&fx.release_grant(account, &request_id, &gid), 1);
    let approval = &mut evidence.approvals[0];
    approval.signature = sshsig::sign(&p.bob.key, "git", &approval.statement).unwrap();
    env.refused(
        request(fx.release_grant(account, &request_id, &gid), Some(evidence)),
        Code::PermissionDenied,
        "signed under namespace \"git\"",
    )
    .await;

    // A replayed operator release: the same grant and statements again.
    let honest = fx.consented(account, 1);
    env.release(honest.request()).await.unwrap();
    let event = env
        .refused(honest.request(), Code::PermissionDenied, "was used already")
        .await;
    assert_eq!(event.attributes["statement"], "the release statement");
    assert_eq!(event.attributes["signer"], user("olivia"));

    // Honest evidence carried by a grant for another request.
    let mut misbound = fx.consented(account, 1).request();
    misbound.grant = Some(fx.release_grant(account, &new_id(), &new_id()));
    let event = env
        .refused(
            misbound,
            Code::PermissionDenied,
            "the grant's request_id is",
        )
        .await;
    assert_eq!(event.attributes["statement"], "the grant");
}

#[tokio::test]
async fn one_approver_under_two_spiffe_ids_counts_once() {
    let env = Env::new(&[]).await;
    let fx = &env.fx;
    let p = &fx.people;
    // One key listed for two people: refused, nothing applied.
    let mut spec: PolicySpec = policy_spec(fx, 1);
    spec.people.push((
        "bob-alt".into(),
        vec![user("bob-alt")],
        p.bob.public().clone(),
    ));
    let doc = spec.to_toml();
    let err = env
        .client()
        .apply_policy(fx.policy_request(&doc, &env.admins()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("is listed for both bob and bob-alt"),
        "{}",
        err.message()
    );
    let event = stored_event(&env.audit, |e| e.action == "policy.refused").await;
    assert_eq!(event.attributes["reason"], err.message());
    let versions = env
        .client()
        .get_policy(GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert!(versions.is_empty());

    // One person with two SPIFFE IDs approving twice counts once.
    let mut spec = policy_spec(fx, 1);
    for entry in &mut spec.people {
        if entry.0 == "bob" {
            entry.1.push(user("bob-alt"));
        }
    }
    spec.accounts[0].approvals_required = 2;
    let doc = spec.to_toml();
    env.client()
        .apply_policy(fx.policy_request(&doc, &env.admins()))
        .await
        .unwrap();
    let (request_id, gid) = (new_id(), new_id());
    let req = fx.request_statement(1, "aws-prod-root", &request_id);
    let approvals = vec![
        by(&p.bob, 1, approval_binding(&req).unwrap()),
        signed(
            &p.bob.key,
            &user("bob-alt"),
            1,
            approval_binding(&req).unwrap(),
        ),
    ];
    let release = fx.release_statement(1, &req, &approvals, &gid);
    let event = env
        .refused(
            request(
                fx.release_grant("aws-prod-root", &request_id, &gid),
                Some(ReleaseEvidence {
                    request: Some(req),
                    approvals,
                    release: Some(release),
                }),
            ),
            Code::PermissionDenied,
            "person bob approved twice",
        )
        .await;
    assert_eq!(event.attributes["signer"], "bob");
}

/// Policy `version` with everyone, listing aws-prod-root.
fn policy_spec(fx: &Fixture, version: u64) -> PolicySpec {
    fx.policy_spec(version, vec![roles("aws-prod-root")])
}

#[tokio::test]
async fn a_policy_signed_by_one_admin_or_replayed_is_refused_and_the_active_one_stays() {
    let env = Env::new(&[]).await;
    // Steps of 2 s, so a few codes need no long wait.
    env.enroll("fast", OLD_SECRET, 2).await;
    let fx = &env.fx;
    let p = &fx.people;
    let release =
        |version: u64| env.release_when_a_step_is_free(fx.consented("fast", version).request());
    // One admin where two are needed: refused; no policy, so no code.
    let v1 = fx.policy(1, vec![roles("aws-prod-root"), roles("fast")]);
    let err = env
        .client()
        .apply_policy(fx.policy_request(&v1, &[&p.adam]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The pinned admins are named by their SPIFFE IDs.
    assert!(
        err.message().contains(&format!(
            "needs 2 distinct admin signatures, it has 1 ({})",
            user("adam")
        )),
        "{}",
        err.message()
    );
    let event = stored_event(&env.audit, |e| e.action == "policy.refused").await;
    assert_eq!(event.attributes["proposed_version"], "1");
    env.refused(
        fx.consented("aws-prod-root", 1).request(),
        Code::FailedPrecondition,
        "no signed policy is in force",
    )
    .await;
    // Signed by both: applied, and a code comes out.
    let applied = env
        .client()
        .apply_policy(fx.policy_request(&v1, &env.admins()))
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!(applied.version, 1);
    assert_eq!(applied.signed_by, [user("adam"), user("anna")]);
    let event = stored_event(&env.audit, |e| e.action == "policy.applied").await;
    assert_eq!(event.actor, format!("{},{}", user("adam"), user("anna")));
    release(1).await.unwrap();
    // Version 2 signed by one admin: refused; evidence under it releases
    // nothing, version 1 stays in force.
    let v2 = fx.policy(2, vec![roles("aws-prod-root"), roles("fast")]);
    let err = env
        .client()
        .apply_policy(fx.policy_request(&v2, &[&p.anna]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    env.refused(
        fx.consented("aws-prod-root", 2).request(),
        Code::FailedPrecondition,
        "was made under policy version 2, the active one is 1",
    )
    .await;
    // Version 2 by both, then version 1 replayed: refused, 2 stays.
    env.client()
        .apply_policy(fx.policy_request(&v2, &env.admins()))
        .await
        .unwrap();
    let err = env
        .client()
        .apply_policy(fx.policy_request(&v1, &env.admins()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("version 1 is not above the active version 2"),
        "{}",
        err.message()
    );
    stored_event(&env.audit, |e| {
        e.action == "policy.refused"
            && e.attributes.get("active_version").map(String::as_str) == Some("2")
    })
    .await;
    let versions: Vec<u64> = env
        .client()
        .get_policy(GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner()
        .versions
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, [2, 1]);
    env.refused(
        fx.consented("fast", 1).request(),
        Code::FailedPrecondition,
        "was made under policy version 1, the active one is 2",
    )
    .await;
    release(2).await.unwrap();
}

#[tokio::test]
async fn enroll_replace_and_remove_need_two_admins() {
    let env = Env::new(&["aws-prod-root"]).await;
    let fx = &env.fx;
    let adam = &fx.people.adam;
    let replace = |consent| EnrollRequest {
        account_id: "aws-prod-root".into(),
        seed: Some(Seed::Base32Secret(NEW_SECRET.into())),
        replace: true,
        grant: Some(fx.enroll_grant("aws-prod-root", "adam")),
        consent,
        ..Default::default()
    };
    for consent in [
        None,
        Some(env.consent("aws-prod-root", AdminAction::EnrollReplace, &[adam])),
    ] {
        let err = env
            .client()
            .enroll(replace(consent.clone()))
            .await
            .unwrap_err();
        let (code, says) = if consent.is_some() {
            (
                Code::FailedPrecondition,
                "enroll with replace of account aws-prod-root needs 2 distinct admins, 1 signed (adam)",
            )
        } else {
            (Code::PermissionDenied, "admin statement #1 is missing")
        };
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
        let event = stored_event(&env.audit, |e| {
            e.action == "admin_action.refused" && e.attributes["reason"] == err.message()
        })
        .await;
        assert_eq!(event.attributes["admin_action"], "enroll with replace");
        assert_eq!(event.actor, format!("spiffe://{TD}/svc/broker"));
    }
    // One admin's statements twice over still count as one.
    let twice = env.consent("aws-prod-root", AdminAction::Remove, &[adam, adam]);
    let err = env
        .client()
        .remove_account(RemoveAccountRequest {
            grant: Some(fx.grant("aws-prod-root", GrantPurpose::Remove)),
            consent: Some(twice),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("remove of account aws-prod-root needs 2 distinct admins, 1 signed (adam)"),
        "{}",
        err.message()
    );
    let event = stored_event(&env.audit, |e| {
        e.action == "admin_action.refused" && e.attributes["reason"] == err.message()
    })
    .await;
    assert_eq!(event.attributes["admin_action"], "remove");
    assert_eq!(event.attributes["signer"], "adam");
    // Consent to another action does not carry over.
    let err = env
        .client()
        .remove_account(RemoveAccountRequest {
            grant: Some(fx.grant("aws-prod-root", GrantPurpose::Remove)),
            consent: Some(env.consent("aws-prod-root", AdminAction::Disable, &env.admins())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The seed is the old one, and the account still there.
    let code = env
        .release_when_a_step_is_free(fx.consented("aws-prod-root", 1).request())
        .await
        .unwrap();
    assert_eq!(code.code, code_of(OLD_SECRET, code.step));
    assert!(
        !env.events()
            .iter()
            .any(|e| e.action.starts_with("account.removed")
                || e.action == "account.enrolled.replace")
    );
}

#[tokio::test]
async fn codes_per_request_and_the_release_rate_hold_across_restarts() {
    let mut env = Env::new(&[]).await;
    let doc = env.fx.policy(
        1,
        vec![AccountRoles {
            codes_per_request: 2,
            releases_per_hour: 3,
            ..roles("fast")
        }],
    );
    env.client()
        .apply_policy(env.fx.policy_request(&doc, &env.admins()))
        .await
        .unwrap();
    // Steps of 2 s, so a few codes need no long wait.
    env.enroll("fast", OLD_SECRET, 2).await;
    let fx = &env.fx;
    let request_id = new_id();
    let req = fx.request_statement(1, "fast", &request_id);
    let approvals = vec![by(&fx.people.bob, 1, approval_binding(&req).unwrap())];
    let release_of_request = || {
        let gid = new_id();
        request(
            fx.release_grant("fast", &request_id, &gid),
            Some(ReleaseEvidence {
                request: Some(req.clone()),
                approvals: approvals.clone(),
                release: Some(fx.release_statement(1, &req, &approvals, &gid)),
            }),
        )
    };
    for _ in 0..2 {
        env.release_when_a_step_is_free(release_of_request())
            .await
            .unwrap();
    }
    let third = release_of_request();
    env.restart().await;
    env.refused(
        third,
        Code::FailedPrecondition,
        &format!("request {request_id} has released 2 of its 2 codes"),
    )
    .await;
    // A new request: the account's third code this hour.
    let fx = &env.fx;
    env.release_when_a_step_is_free(fx.consented("fast", 1).request())
        .await
        .unwrap();
    env.restart().await;
    env.refused(
        env.fx.consented("fast", 1).request(),
        Code::FailedPrecondition,
        "account fast has released 3 codes in the last 3600 s, its limit is 3",
    )
    .await;
}

#[tokio::test]
async fn a_disabled_account_releases_nothing_until_enabled() {
    let env = Env::new(&["aws-prod-root"]).await;
    let fx = &env.fx;
    let set = |enabled: bool, admins: &[&twokey_testkit::consent::Person]| {
        let action = if enabled {
            AdminAction::Enable
        } else {
            AdminAction::Disable
        };
        SetAccountEnabledRequest {
            grant: Some(fx.grant("aws-prod-root", GrantPurpose::SetEnabled)),
            enabled,
            consent: Some(env.consent("aws-prod-root", action, admins)),
        }
    };
    // One admin cannot disable.
    let err = env
        .client()
        .set_account_enabled(set(false, &[&fx.people.adam]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let account = env
        .client()
        .set_account_enabled(set(false, &env.admins()))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert!(account.disabled);
    assert!(env.account("aws-prod-root").await.unwrap().disabled);
    let event = stored_event(&env.audit, |e| e.action == "account.disabled").await;
    assert_eq!(event.actor, format!("{},{}", user("adam"), user("anna")));
    env.refused(
        fx.consented("aws-prod-root", 1).request(),
        Code::FailedPrecondition,
        "account aws-prod-root is disabled",
    )
    .await;
    env.client()
        .set_account_enabled(set(true, &env.admins()))
        .await
        .unwrap();
    env.release(fx.consented("aws-prod-root", 1).request())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_replaced_or_removed_seed_comes_back_within_its_window() {
    let env = Env::new(&["aws-prod-root", "fast"]).await;
    let fx = &env.fx;
    env.enroll("fast", OLD_SECRET, 2).await;
    let code = |secret: &str| {
        let fx = &env.fx;
        let env = &env;
        let secret = secret.to_owned();
        async move {
            let c = env
                .release_when_a_step_is_free(fx.consented("fast", 1).request())
                .await
                .unwrap();
            assert_eq!(c.code, code_of(&secret, c.step), "not the seed {secret}");
        }
    };
    code(OLD_SECRET).await;
    // Replaced by two admins: the new seed's codes.
    env.client()
        .enroll(EnrollRequest {
            account_id: "fast".into(),
            seed: Some(Seed::Base32Secret(NEW_SECRET.into())),
            period: 2,
            replace: true,
            grant: Some(fx.enroll_grant("fast", "adam")),
            consent: Some(env.consent("fast", AdminAction::EnrollReplace, &env.admins())),
            ..Default::default()
        })
        .await
        .unwrap();
    let event = stored_event(&env.audit, |e| e.action == "account.enrolled.replace").await;
    assert_eq!(event.actor, format!("{},{}", user("adam"), user("anna")));
    code(NEW_SECRET).await;
    // Restore needs two admins, then brings the old seed back (and keeps
    // the new one in its place).
    let restore = |admins: &[&twokey_testkit::consent::Person]| RestoreAccountRequest {
        grant: Some(fx.grant("fast", GrantPurpose::Restore)),
        consent: Some(env.consent("fast", AdminAction::Restore, admins)),
    };
    let err = env
        .client()
        .restore_account(restore(&[&fx.people.anna]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    env.client()
        .restore_account(restore(&env.admins()))
        .await
        .unwrap();
    let event = stored_event(&env.audit, |e| e.action == "account.restored").await;
    assert_eq!(event.attributes["kept_reason"], "replaced");
    code(OLD_SECRET).await;
    // Removed by two admins: gone; restored: the same seed again.
    env.client()
        .remove_account(RemoveAccountRequest {
            grant: Some(fx.grant("fast", GrantPurpose::Remove)),
            consent: Some(env.consent("fast", AdminAction::Remove, &env.admins())),
        })
        .await
        .unwrap();
    assert!(env.account("fast").await.is_none());
    let err = env
        .release(fx.consented("fast", 1).request())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    env.client()
        .restore_account(restore(&env.admins()))
        .await
        .unwrap();
    code(OLD_SECRET).await;
    // A second restore brings back what the first one set aside (the new
    // seed); with nothing kept, NOT_FOUND.
    env.client()
        .restore_account(restore(&env.admins()))
        .await
        .unwrap();
    code(NEW_SECRET).await;
    env.client()
        .restore_account(restore(&env.admins()))
        .await
        .unwrap();
    code(OLD_SECRET).await;
    let err = env
        .client()
        .restore_account(RestoreAccountRequest {
            grant: Some(fx.grant("aws-prod-root", GrantPurpose::Restore)),
            consent: Some(env.consent("aws-prod-root", AdminAction::Restore, &env.admins())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn a_tampered_policy_chain_keeps_the_vault_from_starting() {
    use twokey_vault::store::{POLICIES_TREE, StoredPolicy};
    let mut env = Env::new(&["aws-prod-root"]).await;
    env.fx.apply(env.addr(), 2, &["aws-prod-root"]).await;
    let config = env.fx.vault_config(env.audit_server.addr);
    let data = config.data_dir.clone();
    env.stop().await;
    // Edits the policies tree as someone with write access to the data
    // directory would (once the stopped vault's last tasks let go of it).
    let edit = async |f: &dyn Fn(&sled::Tree)| {
        let mut tries = 0;
        let db = loop {
            match twokey_runtime::durable::DurableDb::open(&data) {
                Ok(db) => break db,
                Err(e) if tries < 200 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        let tree = db.tree(POLICIES_TREE).unwrap();
        f(&tree);
        db.sync_blocking().unwrap();
    };
    // The newest version deleted: a rollback to version 1.
    let v2 = std::sync::Mutex::new(None);
    edit(&|t| *v2.lock().unwrap() = t.remove(2u64.to_be_bytes()).unwrap()).await;
    let err = vault_start_error(config.clone()).await;
    assert!(
        err.contains("does not verify from the pinned admins at version 1")
            && err.contains("a newer one was deleted")
            && err.contains("restore it from a backup"),
        "{err}"
    );
    // Put back, it starts (and stops).
    let v2 = v2.lock().unwrap().clone().unwrap();
    edit(&|t| {
        t.insert(2u64.to_be_bytes(), v2.clone()).unwrap();
    })
    .await;
    start_vault(config.clone()).await.stop().await;
    // An unsigned version 3 inserted.
    let mut forged: StoredPolicy = serde_json::from_slice(&v2).unwrap();
    forged.version = 3;
    forged.document = forged.document.replacen("version = 2", "version = 3", 1);
    forged.signatures.clear();
    edit(&|t| {
        t.insert(3u64.to_be_bytes(), serde_json::to_vec(&forged).unwrap())
            .unwrap();
    })
    .await;
    let err = vault_start_error(config).await;
    assert!(
        err.contains("at version 3") && err.contains("needs 2 distinct admin signatures"),
        "{err}"
    );
}
