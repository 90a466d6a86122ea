//! The OpenAPI 3.1 description of the HTTP/JSON API, generated from the proto
//! descriptors (`twokey_proto::FILE_DESCRIPTOR_SET`), never written by hand:
//! one path per unary method of `BrokerService`, schemas in the proto3 JSON
//! mapping (lowerCamelCase names, 64-bit integers as strings, enums as
//! strings, `Timestamp` as an RFC 3339 string), proto comments as
//! descriptions. `twokey-broker openapi` prints it; `docs/openapi.json` is
//! its checked-in copy.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorSet, MethodDescriptorProto,
    field_descriptor_proto::{Label, Type},
};
use serde_json::{Value, json};

/// The proto package of the broker API.
pub const PACKAGE: &str = "twokey.broker.v1";
/// The proto service served over HTTP.
pub const SERVICE: &str = "BrokerService";

/// Connect error codes, in the order of the gRPC code numbers.
pub const CONNECT_CODES: [&str; 16] = [
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// A message or enum of the descriptor set, with its comment.
enum Def<'a> {
    Message(&'a DescriptorProto, Vec<i32>, usize),
    Enum(&'a EnumDescriptorProto, Vec<i32>, usize),
}

/// Every message and enum of the set by full name (no leading dot), and the
/// comments of every file by (file index, path).
struct Index<'a> {
    defs: BTreeMap<String, Def<'a>>,
    comments: BTreeMap<(usize, Vec<i32>), String>,
}

fn clean_comment(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

impl<'a> Index<'a> {
    fn new(set: &'a FileDescriptorSet) -> Self {
        let mut index = Self {
            defs: BTreeMap::new(),
            comments: BTreeMap::new(),
        };
        for (f, file) in set.file.iter().enumerate() {
            if let Some(info) = &file.source_code_info {
                for location in &info.location {
                    if let Some(c) = &location.leading_comments {
                        index
                            .comments
                            .insert((f, location.path.clone()), clean_comment(c));
                    }
                }
            }
            let package = file.package();
            for (i, m) in file.message_type.iter().enumerate() {
                index.add_message(f, package, m, vec![4, i as i32]);
            }
            for (i, e) in file.enum_type.iter().enumerate() {
                index.defs.insert(
                    format!("{package}.{}", e.name()),
                    Def::Enum(e, vec![5, i as i32], f),
                );
            }
        }
        index
    }

    fn add_message(&mut self, f: usize, scope: &str, m: &'a DescriptorProto, path: Vec<i32>) {
        let name = format!("{scope}.{}", m.name());
        for (i, nested) in m.nested_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([3, i as i32]);
            self.add_message(f, &name, nested, p);
        }
        for (i, e) in m.enum_type.iter().enumerate() {
            let mut p = path.clone();
            p.extend([4, i as i32]);
            let en = format!("{name}.{}", e.name());
            self.defs.insert(en, Def::Enum(e, p, f));
        }
        self.defs.insert(name, Def::Message(m, path, f));
    }

    fn comment(&self, file: usize, path: &[i32]) -> Option<&str> {
        self.comments
            .get(&(file, path.to_vec()))
            .map(String::as_str)
            .filter(|c| !c.is_empty())
    }
}

fn with_description(mut schema: Value, description: Option<&str>) -> Value {
    if let (Some(d), Some(obj)) = (description, schema.as_object_mut()) {
        obj.insert("description".into(), Value::String(d.to_owned()));
    }
    schema
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// lowerCamelCase, as protoc derives `json_name`.
fn json_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Drops the schemas nothing refers to (a server-streaming method's response
/// message, answered as Server-Sent Events, for one): a schema stays if a
/// path, or a schema that stays, refers to it.
fn keep_referenced(
    components: &mut serde_json::Map<String, Value>,
    paths: &serde_json::Map<String, Value>,
) {
    fn refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref")
                    && let Some(name) = r.strip_prefix("#/components/schemas/")
                {
                    out.push(name.to_owned());
                }
                map.values().for_each(|v| refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut pending = Vec::new();
    paths.values().for_each(|p| refs(p, &mut pending));
    let mut used = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if used.insert(name.clone())
            && let Some(schema) = components.get(&name)
        {
            refs(schema, &mut pending);
        }
    }
    components.retain(|name, _| used.contains(name));
}

/// Builds schemas for the messages and enums reachable from the roots.
struct Schemas<'a, 'i> {
    index: &'i Index<'a>,
    out: BTreeMap<String, Value>,
    pending: Vec<String>,
    seen: BTreeSet<String>,
}

impl Schemas<'_, '_> {
    fn want(&mut self, name: &str) -> Value {
        if self.seen.insert(name.to_owned()) {
            self.pending.push(name.to_owned());
        }
        reference(name)
    }

    /// The schema of a field's value (one element, for repeated fields).
    fn value_schema(&mut self, ty: Type, type_name: &str) -> Value {
        let name = type_name.trim_start_matches('.');
        match ty {
            Type::Double => json!({ "type": "number", "format": "double" }),
            Type::Float => json!({ "type": "number", "format": "float" }),
            Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
                json!({ "type": "string", "format": "int64", "pattern": "^-?[0-9]+$" })
            }
            Type::Uint64 | Type::Fixed64 => {
                json!({ "type": "string", "format": "uint64", "pattern": "^[0-9]+$" })
            }
            Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
                json!({ "type": "integer", "format": "int32" })
            }
            Type::Uint32 | Type::Fixed32 => {
                json!({ "type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295_u64 })
            }
            Type::Bool => json!({ "type": "boolean" }),
            Type::String => json!({ "type": "string" }),
            Type::Bytes => json!({ "type": "string", "format": "byte" }),
            Type::Enum => self.want(name),
            Type::Message | Type::Group => match name {
                "google.protobuf.Timestamp" => json!({ "type": "string", "format": "date-time" }),
                "google.protobuf.Duration" => {
                    json!({ "type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$" })
                }
                "google.protobuf.Empty" => json!({ "type": "object" }),
                _ => self.want(name),
            },
        }
    }

    fn build(&mut self) {
        while let Some(name) = self.pending.pop() {
            let schema = match self.index.defs.get(&name) {
                Some(Def::Message(m, path, f)) => self.message(m, path, *f),
                Some(Def::Enum(e, path, f)) => {
                    let values: Vec<Value> = e
                        .value
                        .iter()
                        .map(|v| Value::String(v.name().into()))
                        .collect();
                    let lines: Vec<String> = e
                        .value
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let mut p = path.clone();
                            p.extend([2, i as i32]);
                            match self.index.comment(*f, &p) {
                                Some(c) => format!("- `{}`: {}", v.name(), c.replace('\n', " ")),
                                None => format!("- `{}`", v.name()),
                            }
                        })
                        .collect();
                    let mut description = self.index.comment(*f, path).unwrap_or("").to_owned();
                    if !description.is_empty() {
                        description.push_str("\n\n");
                    }
                    description.push_str(&lines.join("\n"));
                    json!({ "type": "string", "enum": values, "description": description })
                }
                None => json!({ "description": format!("{name} (not in the descriptor set)") }),
            };
            self.out.insert(name, schema);
        }
    }

    fn message(&mut self, m: &DescriptorProto, path: &[i32], f: usize) -> Value {
        let mut properties = serde_json::Map::new();
        let entries: BTreeMap<String, &DescriptorProto> = m
            .nested_type
            .iter()
            .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
            .map(|n| (n.name().to_owned(), n))
            .collect();
        for (i, field) in m.field.iter().enumerate() {
            let mut p = path.to_vec();
            p.extend([2, i as i32]);
            let mut description = self.index.comment(f, &p).unwrap_or("").to_owned();
            let ty = field.r#type();
            let map_entry = (ty == Type::Message)
                .then(|| field.type_name().rsplit('.').next().unwrap_or(""))
                .and_then(|short| entries.get(short));
            let schema = if let Some(entry) = map_entry {
                let value = &entry.field[1];
                json!({
                    "type": "object",
                    "additionalProperties": self.value_schema(value.r#type(), value.type_name()),
                })
            } else if field.label() == Label::Repeated {
                json!({ "type": "array", "items": self.value_schema(ty, field.type_name()) })
            } else {
                self.value_schema(ty, field.type_name())
            };
            if let Some(o) = field.oneof_index
                && !field.proto3_optional()
            {
                let oneof = &m.oneof_decl[o as usize];
                let members: Vec<String> = m
                    .field
                    .iter()
                    .filter(|g| g.oneof_index == Some(o))
                    .map(|g| format!("`{}`", g.json_name.clone().unwrap_or(json_name(g.name()))))
                    .collect();
                if !description.is_empty() {
                    description.push('\n');
                }
                description.push_str(&format!(
                    "One of `{}`: set at most one of {}.",
                    oneof.name(),
                    members.join(", ")
                ));
            }
            let schema = if schema.get("$ref").is_some() && !description.is_empty() {
                // A $ref's siblings are allowed in OpenAPI 3.1; keep the field's comment.
                let mut s = schema;
                s["description"] = Value::String(description);
                s
            } else {
                with_description(
                    schema,
                    Some(&description)
                        .filter(|d| !d.is_empty())
                        .map(|d| d.as_str()),
                )
            };
            let name = field
                .json_name
                .clone()
                .unwrap_or_else(|| json_name(field.name()));
            properties.insert(name, schema);
        }
        let mut schema = json!({
            "type": "object",
            "properties": properties,
            "additionalProperties": false,
        });
        if let Some(d) = self.index.comment(f, path) {
            schema["description"] = Value::String(d.to_owned());
        }
        schema
    }
}

fn connect_error_schema() -> Value {
    json!({
        "type": "object",
        "description": "A Connect protocol error. The HTTP status follows the Connect table: invalid_argument, failed_precondition and out_of_range 400, unauthenticated 401, permission_denied 403, not_found 404, already_exists and aborted 409, resource_exhausted 429, canceled 499, unknown, internal and data_loss 500, unimplemented 501, unavailable 503, deadline_exceeded 504. Besides these, the HTTP layer answers 405 (not POST) and 415 (not application/json).",
        "required": ["code"],
        "properties": {
            "code": { "type": "string", "enum": CONNECT_CODES, "description": "The Connect (gRPC) code, in snake_case." },
            "message": { "type": "string", "description": "What was wrong and what to do; the same text the gRPC API gives." },
        },
    })
}

/// The OpenAPI document as JSON.
pub fn document() -> Value {
    let set = FileDescriptorSet::decode(twokey_proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    let index = Index::new(&set);
    let (f, file) = set
        .file
        .iter()
        .enumerate()
        .find(|(_, file)| {
            file.package() == PACKAGE && file.service.iter().any(|s| s.name() == SERVICE)
        })
        .expect("the broker service is in the descriptor set");
    let (s, service) = file
        .service
        .iter()
        .enumerate()
        .find(|(_, s)| s.name() == SERVICE)
        .expect("found above");
    let mut schemas = Schemas {
        index: &index,
        out: BTreeMap::new(),
        pending: Vec::new(),
        seen: BTreeSet::new(),
    };
    let mut paths = serde_json::Map::new();
    let mut grpc_only = Vec::new();
    for (i, method) in service.method.iter().enumerate() {
        if method.client_streaming() {
            grpc_only.push(method.name().to_owned());
            continue;
        }
        let description = index
            .comment(f, &[6, s as i32, 2, i as i32])
            .unwrap_or("")
            .to_owned();
        let mut op = operation(&mut schemas, method, &description);
        if method.server_streaming() {
            let output = method.output_type().trim_start_matches('.');
            op["post"]["description"] = Value::String(format!(
                "{description}\n\nServer streaming, served as Server-Sent Events: each change is `event: <action>` and `data: <proto3 JSON of {output}>`; a `: keep-alive` comment comes every 15 s. The stream ends when the broker shuts down; reconnect and read the state again."
            ));
            op["post"]["responses"]["200"] = json!({
                "description": format!("An event stream of {output} messages."),
                "content": { "text/event-stream": { "schema": { "type": "string" } } },
            });
            if let Some(params) = op["post"]["parameters"].as_array_mut() {
                params.retain(|p| p["name"] != "Connect-Timeout-Ms");
            }
        }
        paths.insert(format!("/{PACKAGE}.{SERVICE}/{}", method.name()), op);
    }
    schemas.build();
    let mut components: serde_json::Map<String, Value> = schemas.out.into_iter().collect();
    components.insert("connect.Error".into(), connect_error_schema());
    keep_referenced(&mut components, &paths);
    let service_doc = index.comment(f, &[6, s as i32]).unwrap_or("");
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "twokey broker HTTP/JSON API",
            "version": "v1",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
            "description": format!(
                "{service_doc}\n\nThe Connect protocol's unary JSON convention over HTTP/1.1 and HTTP/2: `POST /{PACKAGE}.{SERVICE}/<Method>` with `Content-Type: application/json` and the proto3 JSON mapping of the request; the answer is the proto3 JSON mapping of the response, or a Connect error. Unknown fields are rejected (400). Mutual TLS: callers are known by the SPIFFE ID in their client certificate. Server-streaming methods answer with Server-Sent Events (`text/event-stream`) instead.{} Generated from the proto descriptors by `twokey-broker openapi`.",
                if grpc_only.is_empty() {
                    String::new()
                } else {
                    format!(" Client-streaming methods are served over gRPC only: {}.", grpc_only.join(", "))
                }
            ),
        },
        "servers": [{ "url": "https://broker.example:7404", "description": "the broker's http_listen address" }],
        "security": [{ "mtls": [] }],
        "tags": [{ "name": SERVICE, "description": service_doc }],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "mtls": {
                    "type": "mutualTLS",
                    "description": "A client certificate from the twokey CA carrying exactly one SPIFFE ID (URI SAN) in the broker's trust domain.",
                },
            },
        },
    })
}

fn operation(
    schemas: &mut Schemas<'_, '_>,
    method: &MethodDescriptorProto,
    description: &str,
) -> Value {
    let input = schemas.want(method.input_type().trim_start_matches('.'));
    let output = schemas.want(method.output_type().trim_start_matches('.'));
    let error = |what: &str| {
        json!({
            "description": what,
            "content": { "application/json": { "schema": reference("connect.Error") } },
        })
    };
    json!({
        "post": {
            "operationId": method.name(),
            "tags": [SERVICE],
            "summary": description.lines().next().unwrap_or(""),
            "description": description,
            "parameters": [{
                "name": "Connect-Protocol-Version",
                "in": "header",
                "required": false,
                "schema": { "type": "string", "const": "1" },
            }, {
                "name": "Connect-Timeout-Ms",
                "in": "header",
                "required": false,
                "description": "How long the call may take, in milliseconds (at most 30000 is honoured).",
                "schema": { "type": "string", "pattern": "^[0-9]{1,10}$" },
            }],
            "requestBody": {
                "required": true,
                "content": { "application/json": { "schema": input } },
            },
            "responses": {
                "200": {
                    "description": "Success.",
                    "content": { "application/json": { "schema": output } },
                },
                "400": error("invalid_argument (malformed JSON, unknown field, bad value) or failed_precondition (the request's state does not allow this)"),
                "401": error("unauthenticated: no client certificate, or no usable SPIFFE ID in it"),
                "403": error("permission_denied: the caller lacks the role, or separation of duties forbids it"),
                "404": error("not_found: no such request or account"),
                "415": error("invalid_argument: the Content-Type is not application/json"),
                "429": error("resource_exhausted: the body is larger than 256 KiB"),
                "default": error("another Connect error"),
            },
        },
    })
}

/// The document as the pretty-printed JSON that is served and checked in.
pub fn json_text() -> String {
    let mut text =
        serde_json::to_string_pretty(&document()).expect("a JSON value always serialises");
    text.push('\n');
    text
}
