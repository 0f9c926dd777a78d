from fastllm.capture.dynamo import CAPTURE_ERRORS, capture

__all__ = ["CAPTURE_ERRORS", "capture"]
