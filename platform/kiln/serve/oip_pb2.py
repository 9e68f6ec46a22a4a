"""The KServe v2 gRPC protocol (package ``inference``, service ``GRPCInferenceService``): its
message classes and the function that registers the service on a gRPC server.

The file descriptor below is KServe's ``grpc_predict_v2.proto`` as compiled into KServe 0.21.0's
``kserve/protocol/grpc/grpc_predict_v2_pb2.py`` (PyPI wheel), Copyright 2023 The KServe Authors,
licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0; the
notice is in ``platform/kiln/serve/KSERVE_NOTICE``). It is the serialized
``FileDescriptorProto``, base64-encoded; nothing of it was changed.

Why not protoc's generated module: it registers the file in protobuf's default descriptor pool,
where tritonclient's own copy of the same messages (``inference.ModelInferRequest``, from Triton's
``grpc_service.proto``) lives too; a process importing both (a test, a benchmark, a user's script
that starts serving in-process) would fail with a duplicate symbol. The messages here are built in a
pool of their own, with the same wire format, so both coexist. Top-level messages are pickled by
reference to this module (Ray passes them from its proxy to a replica in proxy ingress mode).
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.internal import builder

SERVICE = "inference.GRPCInferenceService"
# The RPCs Kiln serves (KServe's repository extension, RepositoryModelLoad/Unload, is not served:
# a client calling it gets UNIMPLEMENTED from gRPC itself).
METHODS = (
    ("ServerLive", "ServerLiveRequest", "ServerLiveResponse"),
    ("ServerReady", "ServerReadyRequest", "ServerReadyResponse"),
    ("ModelReady", "ModelReadyRequest", "ModelReadyResponse"),
    ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse"),
    ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse"),
    ("ModelInfer", "ModelInferRequest", "ModelInferResponse"),
)

_SERIALIZED = base64.b64decode(
    "ChVncnBjX3ByZWRpY3RfdjIucHJvdG8SCWluZmVyZW5jZSITChFTZXJ2ZXJMaXZlUmVxdWVzdCIiChJTZXJ2ZXJMaXZl"
    "UmVzcG9uc2USDAoEbGl2ZRgBIAEoCCIUChJTZXJ2ZXJSZWFkeVJlcXVlc3QiJAoTU2VydmVyUmVhZHlSZXNwb25zZRIN"
    "CgVyZWFkeRgBIAEoCCIyChFNb2RlbFJlYWR5UmVxdWVzdBIMCgRuYW1lGAEgASgJEg8KB3ZlcnNpb24YAiABKAkiIwoS"
    "TW9kZWxSZWFkeVJlc3BvbnNlEg0KBXJlYWR5GAEgASgIIhcKFVNlcnZlck1ldGFkYXRhUmVxdWVzdCJLChZTZXJ2ZXJN"
    "ZXRhZGF0YVJlc3BvbnNlEgwKBG5hbWUYASABKAkSDwoHdmVyc2lvbhgCIAEoCRISCgpleHRlbnNpb25zGAMgAygJIjUK"
    "FE1vZGVsTWV0YWRhdGFSZXF1ZXN0EgwKBG5hbWUYASABKAkSDwoHdmVyc2lvbhgCIAEoCSKNAgoVTW9kZWxNZXRhZGF0"
    "YVJlc3BvbnNlEgwKBG5hbWUYASABKAkSEAoIdmVyc2lvbnMYAiADKAkSEAoIcGxhdGZvcm0YAyABKAkSPwoGaW5wdXRz"
    "GAQgAygLMi8uaW5mZXJlbmNlLk1vZGVsTWV0YWRhdGFSZXNwb25zZS5UZW5zb3JNZXRhZGF0YRJACgdvdXRwdXRzGAUg"
    "AygLMi8uaW5mZXJlbmNlLk1vZGVsTWV0YWRhdGFSZXNwb25zZS5UZW5zb3JNZXRhZGF0YRo/Cg5UZW5zb3JNZXRhZGF0"
    "YRIMCgRuYW1lGAEgASgJEhAKCGRhdGF0eXBlGAIgASgJEg0KBXNoYXBlGAMgAygDIu4GChFNb2RlbEluZmVyUmVxdWVz"
    "dBISCgptb2RlbF9uYW1lGAEgASgJEhUKDW1vZGVsX3ZlcnNpb24YAiABKAkSCgoCaWQYAyABKAkSQAoKcGFyYW1ldGVy"
    "cxgEIAMoCzIsLmluZmVyZW5jZS5Nb2RlbEluZmVyUmVxdWVzdC5QYXJhbWV0ZXJzRW50cnkSPQoGaW5wdXRzGAUgAygL"
    "Mi0uaW5mZXJlbmNlLk1vZGVsSW5mZXJSZXF1ZXN0LkluZmVySW5wdXRUZW5zb3ISSAoHb3V0cHV0cxgGIAMoCzI3Lmlu"
    "ZmVyZW5jZS5Nb2RlbEluZmVyUmVxdWVzdC5JbmZlclJlcXVlc3RlZE91dHB1dFRlbnNvchIaChJyYXdfaW5wdXRfY29u"
    "dGVudHMYByADKAwalAIKEEluZmVySW5wdXRUZW5zb3ISDAoEbmFtZRgBIAEoCRIQCghkYXRhdHlwZRgCIAEoCRINCgVz"
    "aGFwZRgDIAMoAxJRCgpwYXJhbWV0ZXJzGAQgAygLMj0uaW5mZXJlbmNlLk1vZGVsSW5mZXJSZXF1ZXN0LkluZmVySW5w"
    "dXRUZW5zb3IuUGFyYW1ldGVyc0VudHJ5EjAKCGNvbnRlbnRzGAUgASgLMh4uaW5mZXJlbmNlLkluZmVyVGVuc29yQ29u"
    "dGVudHMaTAoPUGFyYW1ldGVyc0VudHJ5EgsKA2tleRgBIAEoCRIoCgV2YWx1ZRgCIAEoCzIZLmluZmVyZW5jZS5JbmZl"
    "clBhcmFtZXRlcjoCOAEa1QEKGkluZmVyUmVxdWVzdGVkT3V0cHV0VGVuc29yEgwKBG5hbWUYASABKAkSWwoKcGFyYW1l"
    "dGVycxgCIAMoCzJHLmluZmVyZW5jZS5Nb2RlbEluZmVyUmVxdWVzdC5JbmZlclJlcXVlc3RlZE91dHB1dFRlbnNvci5Q"
    "YXJhbWV0ZXJzRW50cnkaTAoPUGFyYW1ldGVyc0VudHJ5EgsKA2tleRgBIAEoCRIoCgV2YWx1ZRgCIAEoCzIZLmluZmVy"
    "ZW5jZS5JbmZlclBhcmFtZXRlcjoCOAEaTAoPUGFyYW1ldGVyc0VudHJ5EgsKA2tleRgBIAEoCRIoCgV2YWx1ZRgCIAEo"
    "CzIZLmluZmVyZW5jZS5JbmZlclBhcmFtZXRlcjoCOAEi1QQKEk1vZGVsSW5mZXJSZXNwb25zZRISCgptb2RlbF9uYW1l"
    "GAEgASgJEhUKDW1vZGVsX3ZlcnNpb24YAiABKAkSCgoCaWQYAyABKAkSQQoKcGFyYW1ldGVycxgEIAMoCzItLmluZmVy"
    "ZW5jZS5Nb2RlbEluZmVyUmVzcG9uc2UuUGFyYW1ldGVyc0VudHJ5EkAKB291dHB1dHMYBSADKAsyLy5pbmZlcmVuY2Uu"
    "TW9kZWxJbmZlclJlc3BvbnNlLkluZmVyT3V0cHV0VGVuc29yEhsKE3Jhd19vdXRwdXRfY29udGVudHMYBiADKAwalwIK"
    "EUluZmVyT3V0cHV0VGVuc29yEgwKBG5hbWUYASABKAkSEAoIZGF0YXR5cGUYAiABKAkSDQoFc2hhcGUYAyADKAMSUwoK"
    "cGFyYW1ldGVycxgEIAMoCzI/LmluZmVyZW5jZS5Nb2RlbEluZmVyUmVzcG9uc2UuSW5mZXJPdXRwdXRUZW5zb3IuUGFy"
    "YW1ldGVyc0VudHJ5EjAKCGNvbnRlbnRzGAUgASgLMh4uaW5mZXJlbmNlLkluZmVyVGVuc29yQ29udGVudHMaTAoPUGFy"
    "YW1ldGVyc0VudHJ5EgsKA2tleRgBIAEoCRIoCgV2YWx1ZRgCIAEoCzIZLmluZmVyZW5jZS5JbmZlclBhcmFtZXRlcjoC"
    "OAEaTAoPUGFyYW1ldGVyc0VudHJ5EgsKA2tleRgBIAEoCRIoCgV2YWx1ZRgCIAEoCzIZLmluZmVyZW5jZS5JbmZlclBh"
    "cmFtZXRlcjoCOAEiaQoOSW5mZXJQYXJhbWV0ZXISFAoKYm9vbF9wYXJhbRgBIAEoCEgAEhUKC2ludDY0X3BhcmFtGAIg"
    "ASgDSAASFgoMc3RyaW5nX3BhcmFtGAMgASgJSABCEgoQcGFyYW1ldGVyX2Nob2ljZSLQAQoTSW5mZXJUZW5zb3JDb250"
    "ZW50cxIVCg1ib29sX2NvbnRlbnRzGAEgAygIEhQKDGludF9jb250ZW50cxgCIAMoBRIWCg5pbnQ2NF9jb250ZW50cxgD"
    "IAMoAxIVCg11aW50X2NvbnRlbnRzGAQgAygNEhcKD3VpbnQ2NF9jb250ZW50cxgFIAMoBBIVCg1mcDMyX2NvbnRlbnRz"
    "GAYgAygCEhUKDWZwNjRfY29udGVudHMYByADKAESFgoOYnl0ZXNfY29udGVudHMYCCADKAwiMAoaUmVwb3NpdG9yeU1v"
    "ZGVsTG9hZFJlcXVlc3QSEgoKbW9kZWxfbmFtZRgBIAEoCSJDChtSZXBvc2l0b3J5TW9kZWxMb2FkUmVzcG9uc2USEgoK"
    "bW9kZWxfbmFtZRgBIAEoCRIQCghpc0xvYWRlZBgCIAEoCCIyChxSZXBvc2l0b3J5TW9kZWxVbmxvYWRSZXF1ZXN0EhIK"
    "Cm1vZGVsX25hbWUYASABKAkiRwodUmVwb3NpdG9yeU1vZGVsVW5sb2FkUmVzcG9uc2USEgoKbW9kZWxfbmFtZRgBIAEo"
    "CRISCgppc1VubG9hZGVkGAIgASgIMtIFChRHUlBDSW5mZXJlbmNlU2VydmljZRJLCgpTZXJ2ZXJMaXZlEhwuaW5mZXJl"
    "bmNlLlNlcnZlckxpdmVSZXF1ZXN0Gh0uaW5mZXJlbmNlLlNlcnZlckxpdmVSZXNwb25zZSIAEk4KC1NlcnZlclJlYWR5"
    "Eh0uaW5mZXJlbmNlLlNlcnZlclJlYWR5UmVxdWVzdBoeLmluZmVyZW5jZS5TZXJ2ZXJSZWFkeVJlc3BvbnNlIgASSwoK"
    "TW9kZWxSZWFkeRIcLmluZmVyZW5jZS5Nb2RlbFJlYWR5UmVxdWVzdBodLmluZmVyZW5jZS5Nb2RlbFJlYWR5UmVzcG9u"
    "c2UiABJXCg5TZXJ2ZXJNZXRhZGF0YRIgLmluZmVyZW5jZS5TZXJ2ZXJNZXRhZGF0YVJlcXVlc3QaIS5pbmZlcmVuY2Uu"
    "U2VydmVyTWV0YWRhdGFSZXNwb25zZSIAElQKDU1vZGVsTWV0YWRhdGESHy5pbmZlcmVuY2UuTW9kZWxNZXRhZGF0YVJl"
    "cXVlc3QaIC5pbmZlcmVuY2UuTW9kZWxNZXRhZGF0YVJlc3BvbnNlIgASSwoKTW9kZWxJbmZlchIcLmluZmVyZW5jZS5N"
    "b2RlbEluZmVyUmVxdWVzdBodLmluZmVyZW5jZS5Nb2RlbEluZmVyUmVzcG9uc2UiABJmChNSZXBvc2l0b3J5TW9kZWxM"
    "b2FkEiUuaW5mZXJlbmNlLlJlcG9zaXRvcnlNb2RlbExvYWRSZXF1ZXN0GiYuaW5mZXJlbmNlLlJlcG9zaXRvcnlNb2Rl"
    "bExvYWRSZXNwb25zZSIAEmwKFVJlcG9zaXRvcnlNb2RlbFVubG9hZBInLmluZmVyZW5jZS5SZXBvc2l0b3J5TW9kZWxV"
    "bmxvYWRSZXF1ZXN0GiguaW5mZXJlbmNlLlJlcG9zaXRvcnlNb2RlbFVubG9hZFJlc3BvbnNlIgBiBnByb3RvMw=="
)

_POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = _POOL.AddSerializedFile(_SERIALIZED)
_messages: dict[str, Any] = {}
builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, _messages)
builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _messages)

ServerLiveRequest = _messages["ServerLiveRequest"]
ServerLiveResponse = _messages["ServerLiveResponse"]
ServerReadyRequest = _messages["ServerReadyRequest"]
ServerReadyResponse = _messages["ServerReadyResponse"]
ModelReadyRequest = _messages["ModelReadyRequest"]
ModelReadyResponse = _messages["ModelReadyResponse"]
ServerMetadataRequest = _messages["ServerMetadataRequest"]
ServerMetadataResponse = _messages["ServerMetadataResponse"]
ModelMetadataRequest = _messages["ModelMetadataRequest"]
ModelMetadataResponse = _messages["ModelMetadataResponse"]
ModelInferRequest = _messages["ModelInferRequest"]
ModelInferResponse = _messages["ModelInferResponse"]
InferTensorContents = _messages["InferTensorContents"]
InferParameter = _messages["InferParameter"]


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802
    """Register ``GRPCInferenceService``'s RPCs on ``server`` (what protoc's ``*_pb2_grpc`` module
    does; Ray Serve's ``gRPCOptions.grpc_servicer_functions`` names this function). Ray Serve
    replaces each handler with its own, which calls the ingress deployment's method of the RPC's
    name; only the request deserializers given here are kept."""
    import grpc

    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_messages[request].FromString,
            response_serializer=_messages[response].SerializeToString,
        )
        for name, request, response in METHODS
    }
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    server.add_generic_rpc_handlers((generic,))
    add_registered = getattr(server, "add_registered_method_handlers", None)
    if add_registered is not None:  # grpcio >= 1.63 registers the methods too
        add_registered(SERVICE, handlers)
