//! The peer protocol's parsers on arbitrary bytes: a frame (header, bounds,
//! checksums), a hello, a create-replica request, a member list, allocation
//! runs, primary claims, witness requests and vote records. None may
//! panic; a frame that
//! decodes must encode back to the same bytes.
#![no_main]

use ditto_peer::wire::{
    decode_members, decode_replica_ref, decode_runs, decode_vote_record, encode_vote_record,
    CreateReplica, Frame, Hello, HelloOk, PrimaryClaim, WitnessRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data, 1 << 20) {
        let again = frame.encode().expect("a decoded frame encodes");
        assert_eq!(&again[..], data, "decode/encode round trip");
    }
    if let Ok(hello) = Hello::decode(data) {
        let again = hello.encode().expect("a decoded hello encodes");
        assert_eq!(Hello::decode(&again).ok(), Some(hello));
    }
    let _ = HelloOk::decode(&bytes::Bytes::copy_from_slice(data));
    let _ = decode_runs(data);
    let _ = decode_replica_ref(data);
    if let Ok(members) = decode_members(data) {
        assert_eq!(decode_members(&ditto_peer::wire::encode_members(&members)).ok(), Some(members));
    }
    if let Ok(claim) = PrimaryClaim::decode(data) {
        assert_eq!(PrimaryClaim::decode(&claim.encode()).ok(), Some(claim));
    }
    if let Ok(req) = WitnessRequest::decode(data) {
        assert_eq!(WitnessRequest::decode(&req.encode()).ok(), Some(req));
    }
    if let Ok(record) = decode_vote_record(data) {
        assert_eq!(decode_vote_record(&encode_vote_record(&record)).ok(), Some(record));
    }
    if let Ok(req) = CreateReplica::decode(data) {
        let again = req.encode().expect("a decoded request encodes");
        assert_eq!(CreateReplica::decode(&again).ok(), Some(req));
    }
});
