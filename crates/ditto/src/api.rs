//! The REST API the CLI (and any script) drives: axum routes over [`Node`], plus its OpenAPI description.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use ditto_control::{validate, ControlError};
use serde::Deserialize;

use crate::api_types::{
    AddReplica, ApiErrorBody, CreatePool, CreateVolume, ReaddResult, ReplicaRef, ResolveRequest,
    ScrubRequest, StartVolume, StopVolume, VolumeInfo,
};
use crate::events::{EventLog, EventsPage};
use crate::node::Node;

pub struct ApiError(ControlError);

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ApiErrorBody {
            error: self.0.to_string(),
            code: self.0.code().into(),
        };
        (status, Json(body)).into_response()
    }
}

fn bad_body(e: impl std::fmt::Display) -> ApiError {
    ApiError(ControlError::InvalidRequest(e.to_string()))
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    volume: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    wait_ms: Option<u64>,
    limit: Option<usize>,
    volume: Option<String>,
}

/// Longest long poll of `GET /v1/events`; a larger `wait_ms` is cut to this.
const EVENTS_MAX_WAIT_MS: u64 = 30_000;
/// Most events in one answer; a larger `limit` is cut to this.
const EVENTS_MAX_LIMIT: usize = 1000;

/// `GET /v1/events`, with the event log as its own state so the node need not
/// carry it; merge it into [`router`].
pub fn events_router(log: Arc<EventLog>) -> Router {
    Router::new()
        .route("/v1/events", get(events))
        .with_state(log)
}

async fn events(
    State(log): State<Arc<EventLog>>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<EventsPage> {
    let Query(q) = q.map_err(bad_body)?;
    let limit = q.limit.unwrap_or(EVENTS_MAX_LIMIT);
    if limit == 0 {
        return Err(bad_body("limit must be at least 1"));
    }
    if let Some(v) = &q.volume {
        validate::name("volume", v)?;
    }
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0).min(EVENTS_MAX_WAIT_MS));
    Ok(Json(
        log.poll(
            q.since,
            limit.min(EVENTS_MAX_LIMIT),
            q.volume.as_deref(),
            wait,
        )
        .await,
    ))
}

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/pools", get(list_pools).post(create_pool))
        .route("/v1/pools/{name}", delete(delete_pool))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/start", post(start_volume))
        .route("/v1/volumes/{name}/stop", post(stop_volume))
        .route("/v1/volumes/{name}/promote", post(promote_volume))
        .route("/v1/volumes/{name}/demote", post(demote_volume))
        .route("/v1/volumes/{name}/scrub", post(scrub_volume))
        .route("/v1/volumes/{name}/resolve", post(resolve_volume))
        .route("/v1/volumes/{name}/replicas", post(add_replica))
        .route("/v1/volumes/{name}/replicas/readd", post(readd_replica))
        .route("/v1/volumes/{name}/replicas/fail", post(fail_replica))
        .route("/v1/volumes/{name}/replicas/remove", post(remove_replica))
        .route("/v1/nodes", get(list_nodes).post(add_node))
        .route("/v1/nodes/{name}", delete(remove_node))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async {
            ApiError(ControlError::InvalidRequest(
                "no such API endpoint; see /v1/openapi.json".into(),
            ))
        })
        .with_state(node)
}

async fn status(
    State(node): State<Arc<Node>>,
    q: Result<Query<StatusQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return bad_body(e).into_response(),
    };
    match node.status(q.volume.as_deref()) {
        Ok(s) => Json(s).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

async fn list_nodes(
    State(node): State<Arc<Node>>,
) -> ApiResult<Vec<crate::api_types::PeerNodeInfo>> {
    Ok(Json(node.dialer().probe_all().await))
}

async fn add_node(
    State(node): State<Arc<Node>>,
    body: Result<Json<crate::api_types::AddNode>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::api_types::PeerNodeInfo>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    Ok((StatusCode::CREATED, Json(node.add_node(req).await?)))
}

async fn remove_node(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.remove_node(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_pools(State(node): State<Arc<Node>>) -> ApiResult<Vec<crate::api_types::PoolInfo>> {
    Ok(Json(node.pools()?))
}

async fn create_pool(
    State(node): State<Arc<Node>>,
    body: Result<Json<CreatePool>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::api_types::PoolInfo>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    Ok((StatusCode::CREATED, Json(node.create_pool(req).await?)))
}

async fn delete_pool(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.delete_pool(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_volumes(
    State(node): State<Arc<Node>>,
) -> ApiResult<Vec<crate::api_types::VolumeInfo>> {
    Ok(Json(node.volumes()?))
}

async fn get_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
) -> ApiResult<crate::api_types::VolumeInfo> {
    Ok(Json(node.volume(&name)?))
}

async fn create_volume(
    State(node): State<Arc<Node>>,
    body: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::api_types::VolumeInfo>), ApiError> {
    let Json(req) = body.map_err(bad_body)?;
    Ok((StatusCode::CREATED, Json(node.create_volume(req).await?)))
}

async fn delete_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Query(q) = q.map_err(bad_body)?;
    node.delete_volume(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(bad_body)
}

async fn start_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<StartVolume>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let req = body(b)?;
    Ok(Json(
        node.start_volume(&name, req.degraded, req.force_stale)
            .await?,
    ))
}

async fn demote_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<crate::api_types::DemoteVolume>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = body(b)?;
    node.demote(&name, &req.to).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn promote_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<crate::api_types::PromoteVolume>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let req = body(b)?;
    Ok(Json(node.promote(&name, req.force).await?))
}

async fn stop_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<StopVolume>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let req = body(b)?;
    node.stop_volume(&name, req.force).await?;
    Ok(Json(serde_json::json!({"stopped": name})))
}

async fn scrub_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<ScrubRequest>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let req = body(b)?;
    node.scrub(&name, req.repair, req.source.as_deref()).await?;
    Ok(Json(serde_json::json!({"scrub_started": name})))
}

async fn resolve_volume(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<ResolveRequest>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let req = body(b)?;
    Ok(Json(node.resolve(&name, &req.keep).await?))
}

async fn add_replica(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<AddReplica>, JsonRejection>,
) -> ApiResult<VolumeInfo> {
    let req = body(b)?;
    Ok(Json(node.add_replica(&name, &req.pool).await?))
}

async fn readd_replica(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<ReplicaRef>, JsonRejection>,
) -> ApiResult<ReaddResult> {
    let req = body(b)?;
    let plan = node.readd_replica(&name, &req.replica).await?;
    Ok(Json(match plan {
        ditto_engine::ReaddPlan::CatchUp { regions } => ReaddResult {
            plan: "catch_up".into(),
            dirty_regions: Some(regions),
        },
        ditto_engine::ReaddPlan::FullRebuild => ReaddResult {
            plan: "full_rebuild".into(),
            dirty_regions: None,
        },
    }))
}

async fn fail_replica(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<ReplicaRef>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let req = body(b)?;
    node.fail_replica(&name, &req.replica).await?;
    Ok(Json(serde_json::json!({"failed": req.replica})))
}

async fn remove_replica(
    State(node): State<Arc<Node>>,
    Path(name): Path<String>,
    b: Result<Json<ReplicaRef>, JsonRejection>,
) -> ApiResult<serde_json::Value> {
    let req = body(b)?;
    node.remove_replica(&name, &req.replica).await?;
    Ok(Json(serde_json::json!({"removed": req.replica})))
}

async fn openapi() -> Json<serde_json::Value> {
    Json(openapi_document())
}

/// The OpenAPI 3.1 description of this API. Written out by hand (a derive
/// crate would double the build time of the daemon); `openapi_lists_every_route`
/// keeps it in step with the router.
pub fn openapi_document() -> serde_json::Value {
    use serde_json::json;
    let err = json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let name_param =
        json!({"name": "name", "in": "path", "required": true, "schema": {"type": "string"}});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "ditto node API", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/status": {"get": {"summary": "Node, volume and pool status", "parameters": [
                {"name": "volume", "in": "query", "required": false, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "status", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}}, "404": err}}},
            "/v1/pools": {
                "get": {"summary": "List pools", "responses": {"200": {"description": "pools", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Pool"}}}}}}},
                "post": {"summary": "Create a directory pool", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CreatePool"}}}},
                    "responses": {"201": {"description": "created", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Pool"}}}}, "400": err, "409": err}}},
            "/v1/nodes": {"get": {"summary": "The other nodes this node knows (config [nodes] and `node add`), each tried now: connected, round trip, protocol version, or why not",
                "responses": {"200": {"description": "nodes", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/PeerNode"}}}}}}},
                "post": {"summary": "Add a node: it must answer at the address under that name", "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["name", "address"], "additionalProperties": false,
                    "properties": {"name": {"type": "string"}, "address": {"type": "string"}}}}}},
                    "responses": {"201": {"description": "added", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PeerNode"}}}}, "400": err}}},
            "/v1/nodes/{name}": {"delete": {"summary": "Forget a node added with `node add` (not one from the config, nor one in use)", "parameters": [name_param],
                "responses": {"204": {"description": "removed"}, "400": err}}},
            "/v1/pools/{name}": {"delete": {"summary": "Delete an empty pool", "parameters": [name_param],
                "responses": {"204": {"description": "deleted"}, "404": err, "409": err}}},
            "/v1/volumes": {
                "get": {"summary": "List volumes", "responses": {"200": {"description": "volumes", "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Volume"}}}}}}},
                "post": {"summary": "Create a mirrored volume", "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CreateVolume"}}}},
                    "responses": {"201": {"description": "created", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "400": err, "404": err, "409": err, "507": err}}},
            "/v1/volumes/{name}": {
                "get": {"summary": "One volume", "parameters": [name_param], "responses": {"200": {"description": "volume", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "404": err}},
                "delete": {"summary": "Delete a volume and its replicas", "parameters": [name_param,
                    {"name": "force", "in": "query", "required": false, "schema": {"type": "boolean"}, "description": "disconnect connected clients"}],
                    "responses": {"204": {"description": "deleted"}, "404": err, "409": err}}},
            "/v1/events": {"get": {"summary": "Events newer than `since`, oldest first; with `wait_ms`, waits for one (long poll)", "parameters": [
                {"name": "since", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "default": 0}, "description": "return events with a larger seq (the `next` of the previous answer)"},
                {"name": "wait_ms", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "maximum": 30000, "default": 0}, "description": "if there is no such event yet, wait up to this long for one (larger values are cut to 30000)"},
                {"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 1000}, "description": "most events to return (larger values are cut to 1000)"},
                {"name": "volume", "in": "query", "required": false, "schema": {"type": "string"}, "description": "only events of this volume"}],
                "responses": {"200": {"description": "events", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EventsPage"}}}}, "400": err}}},
            "/v1/volumes/{name}/start": {"post": {"summary": "Start a stopped volume", "parameters": [name_param],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"degraded": {"type": ["boolean", "null"]}, "force_stale": {"type": "boolean"}}}}}},
                "responses": {"200": {"description": "volume", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "400": err, "404": err}}},
            "/v1/volumes/{name}/promote": {"post": {"summary": "Make this node the volume's primary: the current primary hands it over (only with this node's replica in sync) and this node serves it", "parameters": [name_param],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"force": {"type": "boolean"}}}}}},
                "responses": {"200": {"description": "volume", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "400": err, "500": err}}},
            "/v1/volumes/{name}/demote": {"post": {"summary": "On the primary: node `to` (holding an in-sync replica) takes the volume over by a planned switch-over", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["to"], "additionalProperties": false, "properties": {"to": {"type": "string"}}}}}},
                "responses": {"204": {"description": "handed over"}, "400": err, "404": err, "500": err}}},
            "/v1/volumes/{name}/stop": {"post": {"summary": "Stop serving a volume", "parameters": [name_param],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"force": {"type": "boolean"}}}}}},
                "responses": {"200": {"description": "stopped"}, "409": err}}},
            "/v1/volumes/{name}/scrub": {"post": {"summary": "Start a scrub", "parameters": [name_param],
                "requestBody": {"content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "properties": {"repair": {"type": "boolean"}, "source": {"type": ["string", "null"]}}}}}},
                "responses": {"200": {"description": "started"}, "400": err}}},
            "/v1/volumes/{name}/resolve": {"post": {"summary": "Resolve a split brain by keeping one replica", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "required": ["keep"], "properties": {"keep": {"type": "string"}}}}}},
                "responses": {"200": {"description": "volume", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "400": err}}},
            "/v1/volumes/{name}/replicas": {"post": {"summary": "Add a replica on a pool (rebuilt while serving)", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "additionalProperties": false, "required": ["pool"], "properties": {"pool": {"type": "string"}}}}}},
                "responses": {"200": {"description": "volume", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Volume"}}}}, "400": err, "404": err, "507": err}}},
            "/v1/volumes/{name}/replicas/readd": {"post": {"summary": "Re-add a failed, stale or missing replica", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplicaRef"}}}},
                "responses": {"200": {"description": "plan", "content": {"application/json": {"schema": {"type": "object", "properties": {"plan": {"type": "string", "enum": ["catch_up", "full_rebuild"]}, "dirty_regions": {"type": ["integer", "null"]}}}}}}, "400": err}}},
            "/v1/volumes/{name}/replicas/fail": {"post": {"summary": "Fail a replica out on purpose", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplicaRef"}}}},
                "responses": {"200": {"description": "failed"}, "400": err}}},
            "/v1/volumes/{name}/replicas/remove": {"post": {"summary": "Remove a replica from the volume", "parameters": [name_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReplicaRef"}}}},
                "responses": {"200": {"description": "removed"}, "400": err}}},
            "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI document"}}}}
        },
        "components": {"schemas": {
            "PeerNode": {"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "string"}, "connected": {"type": "boolean"},
                "rtt_ms": {"type": ["number", "null"]}, "protocol": {"type": ["integer", "null"]}, "error": {"type": ["string", "null"]},
                "source": {"type": "string", "enum": ["config", "added"]}}},
            "ReplicaRef": {"type": "object", "additionalProperties": false, "required": ["replica"], "properties": {"replica": {"type": "string", "description": "id prefix, pool name or path"}}},
            "Error": {"type": "object", "required": ["error", "code"], "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
            "Event": {"type": "object", "required": ["v", "seq", "time_unix_ms", "kind", "volume", "message"],
                "properties": {"v": {"type": "integer", "const": 1}, "seq": {"type": "integer"}, "time_unix_ms": {"type": "integer"},
                    "kind": {"type": "string", "examples": ["replica_failed", "resync_progress"]}, "volume": {"type": "string"},
                    "replica": {"type": ["string", "null"]}, "message": {"type": "string"},
                    "progress": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["done", "total"], "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}}}]}}},
            "EventsPage": {"type": "object", "required": ["events", "next"], "properties": {
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                "next": {"type": "integer", "description": "pass as `since` to continue"}}},
            "CreatePool": {"type": "object", "additionalProperties": false, "required": ["name", "path"],
                "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}, "path": {"type": "string"}}},
            "CreateVolume": {"type": "object", "additionalProperties": false, "required": ["name", "size"],
                "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                    "size": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "examples": ["1G", "512MiB"]}]},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 8, "default": 2},
                    "pools": {"type": "array", "items": {"type": "string"}},
                    "nodes": {"type": "array", "items": {"type": "string"}},
                    "region_size": {"type": "string", "examples": ["1M"]},
                    "tiebreaker": {"type": "string", "description": "a node without a replica that votes in the majority quorum"}}},
            "Pool": {"type": "object", "properties": {"name": {"type": "string"}, "uuid": {"type": "string"}, "kind": {"type": "string"}, "path": {"type": "string"},
                "total_bytes": {"type": "integer"}, "free_bytes": {"type": "integer"}, "fs_free_bytes": {"type": "integer"}, "reserved_bytes": {"type": "integer"}, "replicas": {"type": "integer"}}},
            "Replica": {"type": "object", "properties": {"id": {"type": "string"}, "pool": {"type": "string"}, "path": {"type": "string"},
                "state": {"type": "string", "enum": ["in_sync", "failed", "stale", "missing"]}, "reason": {"type": ["string", "null"]},
                "generation": {"type": ["integer", "null"]}, "data_offset": {"type": ["integer", "null"]},
                "reads": {"type": "integer"}, "writes": {"type": "integer"}, "errors": {"type": "integer"}}},
            "Client": {"type": "object", "properties": {"id": {"type": "integer"}, "peer": {"type": "string"}, "connected_at_unix": {"type": "integer"}}},
            "Volume": {"type": "object", "properties": {"name": {"type": "string"}, "uuid": {"type": "string"}, "size": {"type": "integer"},
                "state": {"type": "string", "enum": ["healthy", "degraded", "failed", "stopped"]}, "reason": {"type": ["string", "null"]},
                "generation": {"type": "integer"}, "export": {"type": "string"},
                "replicas": {"type": "array", "items": {"$ref": "#/components/schemas/Replica"}},
                "clients": {"type": "array", "items": {"$ref": "#/components/schemas/Client"}},
                "dirty_regions": {"type": "integer"}, "hot_set_regions": {"type": "integer"}, "region_size": {"type": "integer"},
                "copied_bytes": {"type": "integer"}, "epoch": {"type": "integer"}, "quorum": {"type": ["string", "null"]},
                "tiebreaker": {"type": "object", "properties": {"node": {"type": "string"}, "votes": {"type": "boolean"}}}}},
            "Status": {"type": "object", "properties": {"node": {"type": "object"},
                "volumes": {"type": "array", "items": {"$ref": "#/components/schemas/Volume"}},
                "pools": {"type": "array", "items": {"$ref": "#/components/schemas/Pool"}}}}
        }}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn openapi_lists_every_route() {
        let doc = super::openapi_document();
        let src = include_str!("api.rs");
        let paths = doc["paths"].as_object().unwrap();
        for line in src
            .lines()
            .filter(|l| l.trim_start().starts_with(".route(\""))
        {
            let path = line.split('"').nth(1).unwrap();
            assert!(
                paths.contains_key(path),
                "route {path} missing from the OpenAPI document"
            );
        }
        assert_eq!(
            paths.len(),
            src.lines()
                .filter(|l| l.trim_start().starts_with(".route(\""))
                .count()
        );
    }
}
