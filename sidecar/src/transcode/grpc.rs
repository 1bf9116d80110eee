//! The gRPC side of transcoding: message framing (the 5-byte length prefix), the status code
//! table (google.rpc codes to HTTP statuses, as `google/rpc/code.proto` documents them), the
//! JSON status body.
use base64::Engine as _;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use super::template::percent_decode;

/// The gRPC message frame of `message`: not compressed, 4-byte big-endian length, the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.freeze()
}

/// Splits a response body into messages, refusing compressed or oversized ones.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    max: usize,
}

impl Deframer {
    pub fn new(max: usize) -> Deframer {
        Deframer {
            buf: BytesMut::new(),
            max,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if one has arrived.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let compressed = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if compressed != 0 {
            return Err(
                "the app sent a compressed message (the sidecar asks for none: grpc-accept-encoding is not sent)"
                    .to_owned(),
            );
        }
        if len > self.max {
            return Err(format!(
                "the app sent a {len}-byte message, over max_message_bytes ({})",
                self.max
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes of an unfinished message are left: the stream was cut.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// gRPC status codes by number (`google.rpc.Code`).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a gRPC status code (`UNKNOWN` past the table), for metrics.
pub fn code_name(code: u32) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// The HTTP status of a gRPC status code (`google/rpc/code.proto`).
pub fn http_status(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        // UNKNOWN, INTERNAL, DATA_LOSS and codes past the table.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// A gRPC status: from the app's trailers, or made up by the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusBody {
    pub code: u32,
    pub message: String,
    /// `grpc-status-details-bin`, decoded from base64.
    details: Option<Bytes>,
}

impl StatusBody {
    pub fn new(code: u32, message: impl Into<String>) -> StatusBody {
        StatusBody {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// The status in `headers` (trailers, or the head of a trailers-only answer), if any.
    pub fn from_headers(headers: &HeaderMap) -> Option<StatusBody> {
        let code = headers.get("grpc-status")?;
        let code = code
            .to_str()
            .ok()
            .and_then(|c| c.parse::<u32>().ok())
            .unwrap_or(2);
        let message = headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(|m| percent_decode(m, false).unwrap_or_else(|_| m.to_owned()))
            .unwrap_or_default();
        let details = headers.get("grpc-status-details-bin").and_then(|d| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(
                    d.as_bytes()
                        .strip_suffix(b"==")
                        .or(d.as_bytes().strip_suffix(b"="))
                        .unwrap_or(d.as_bytes()),
                )
                .ok()
                .map(Bytes::from)
        });
        Some(StatusBody {
            code,
            message,
            details,
        })
    }

    /// `{"code":5,"message":"...","details":[...]}`: details are JSON where `pool` knows the
    /// type, else `{"@type": URL, "value": base64}`.
    pub fn to_json(&self, pool: Option<&DescriptorPool>) -> Vec<u8> {
        let mut details = Vec::new();
        if let Some(rpc) = self
            .details
            .as_ref()
            .and_then(|d| <RpcStatus as prost::Message>::decode(d.clone()).ok())
        {
            for any in rpc.details {
                let name = any.type_url.rsplit('/').next().unwrap_or_default();
                let known = pool
                    .and_then(|p| p.get_message_by_name(name))
                    .and_then(|desc| DynamicMessage::decode(desc, any.value.as_slice()).ok())
                    .and_then(|m| {
                        m.serialize_with_options(
                            serde_json::value::Serializer,
                            &SerializeOptions::new(),
                        )
                        .ok()
                    });
                let mut obj = match known {
                    Some(serde_json::Value::Object(map)) => map,
                    _ => {
                        let mut map = serde_json::Map::new();
                        map.insert(
                            "value".to_owned(),
                            base64::engine::general_purpose::STANDARD
                                .encode(&any.value)
                                .into(),
                        );
                        map
                    }
                };
                obj.insert("@type".to_owned(), any.type_url.into());
                details.push(serde_json::Value::Object(obj));
            }
        }
        let body = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "details": details,
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let framed = [frame(b"hello"), frame(b""), frame(&[7u8; 300])].concat();
        for split in 0..framed.len() {
            let mut d = Deframer::new(1024);
            let mut got = Vec::new();
            for part in [&framed[..split], &framed[split..]] {
                d.push(part);
                while let Some(m) = d.next_message().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(&got[0][..], b"hello");
            assert!(got[1].is_empty());
            assert_eq!(got[2].len(), 300);
            assert!(d.is_empty());
        }
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused() {
        let mut d = Deframer::new(10);
        d.push(&[1, 0, 0, 0, 1, 0]);
        assert!(d.next_message().unwrap_err().contains("compressed"));
        let mut d = Deframer::new(10);
        d.push(&[0, 0, 0, 0, 11]);
        assert!(d.next_message().unwrap_err().contains("max_message_bytes"));
    }

    #[test]
    fn status_table_follows_google_rpc_code() {
        let table = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
            (99, 500),
        ];
        for (code, status) in table {
            assert_eq!(http_status(code).as_u16(), status, "code {code}");
        }
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(99), "UNKNOWN");
    }

    #[test]
    fn status_from_trailers_decodes_message_and_details() {
        let rpc = RpcStatus {
            code: 5,
            message: "gone".to_owned(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/x.Unknown".to_owned(),
                value: vec![1, 2, 3],
            }],
        };
        let bin = base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(prost::Message::encode_to_vec(&rpc));
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert("grpc-message", "order%2042 not found".parse().unwrap());
        h.insert("grpc-status-details-bin", bin.parse().unwrap());
        let s = StatusBody::from_headers(&h).unwrap();
        assert_eq!(s.code, 5);
        assert_eq!(s.message, "order 42 not found");
        let json: serde_json::Value = serde_json::from_slice(&s.to_json(None)).unwrap();
        assert_eq!(json["code"], 5);
        assert_eq!(json["message"], "order 42 not found");
        assert_eq!(json["details"][0]["@type"], "type.googleapis.com/x.Unknown");
        assert_eq!(json["details"][0]["value"], "AQID");
        assert!(StatusBody::from_headers(&HeaderMap::new()).is_none());
    }
}
