//! The one table of the broker's RPCs: each method's name, its `Broker`
//! function, its request and response messages, and which ids its request
//! names (recorded on the call's span). The gRPC service, the HTTP/JSON
//! routes and the call-id recording are generated from it, so a new RPC is
//! the proto plus one line here.

/// Calls `$then! { unary: [(Name, function, Request, Response, ids)...],
/// streaming: [Name...] }` with every RPC; `ids` is `request`, `account`,
/// `input` (the message names neither but is the call's input) or `neither`
/// (the call takes no input).
macro_rules! broker_rpcs {
    ($then:ident) => {
        $then! {
            unary: [
                (WhoAmI, who_am_i, WhoAmIRequest, WhoAmIResponse, neither),
                (CreateRequest, create_request, CreateRequestRequest, CreateRequestResponse, account),
                (GetRequest, get_request, GetRequestRequest, GetRequestResponse, request),
                (ListRequests, list_requests, ListRequestsRequest, ListRequestsResponse, account),
                (ApproveRequest, approve_request, ApproveRequestRequest, ApproveRequestResponse, request),
                (DenyRequest, deny_request, DenyRequestRequest, DenyRequestResponse, request),
                (CancelRequest, cancel_request, CancelRequestRequest, CancelRequestResponse, request),
                (VerifyPin, verify_pin, VerifyPinRequest, VerifyPinResponse, request),
                (ResendPin, resend_pin, ResendPinRequest, ResendPinResponse, request),
                (ShowPin, show_pin, ShowPinRequest, ShowPinResponse, request),
                (ReleaseCode, release_code, ReleaseCodeRequest, ReleaseCodeResponse, request),
                (EnrollAccount, enroll_account, EnrollAccountRequest, EnrollAccountResponse, account),
                (ListAccounts, list_accounts, ListAccountsRequest, ListAccountsResponse, neither),
                (RemoveAccount, remove_account, RemoveAccountRequest, RemoveAccountResponse, account),
                (SetAccountEnabled, set_account_enabled, SetAccountEnabledRequest, SetAccountEnabledResponse, account),
                (RestoreAccount, restore_account, RestoreAccountRequest, RestoreAccountResponse, account),
                (SignAdminAction, sign_admin_action, SignAdminActionRequest, SignAdminActionResponse, input),
                (ListAdminActions, list_admin_actions, ListAdminActionsRequest, ListAdminActionsResponse, neither),
                (ProposePolicy, propose_policy, ProposePolicyRequest, ProposePolicyResponse, input),
                (SignPolicy, sign_policy, SignPolicyRequest, SignPolicyResponse, input),
                (ApplyPolicy, apply_policy, ApplyPolicyRequest, ApplyPolicyResponse, input),
                (GetPolicy, get_policy, GetPolicyRequest, GetPolicyResponse, neither),
            ],
            streaming: [
                (WatchRequests, watch_requests, WatchRequestsRequest, WatchRequestsResponse, account),
            ],
        }
    };
}

pub(crate) use broker_rpcs;

macro_rules! names {
    (unary: [$(($name:ident, $($_u:tt)*)),* $(,)?], streaming: [$(($sname:ident, $($_s:tt)*)),* $(,)?] $(,)?) => {
        /// The unary methods (every unary method of the service; a test
        /// checks this against the descriptors).
        pub const UNARY: &[&str] = &[$(stringify!($name)),*];
        /// Server-streaming methods.
        pub const STREAMING: &[&str] = &[$(stringify!($sname)),*];
    };
}

broker_rpcs!(names);
