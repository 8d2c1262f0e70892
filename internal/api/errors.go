package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Error is an API error in the restJson1 shape: its Type goes in the
// x-amzn-ErrorType header and, with Message and the optional members, in
// the JSON body.
type Error struct {
	Status       int
	Type         string
	Message      string
	ResourceID   string
	ResourceType string
	RetryAfter   int
	ServiceCode  string
	QuotaCode    string
}

func (e *Error) Error() string { return e.Type + ": " + e.Message }

func validation(format string, args ...any) *Error {
	return &Error{Status: 400, Type: "ValidationException", Message: fmt.Sprintf(format, args...)}
}

// fieldError formats a ValidationException the way AWS does, naming the
// field and the rule it breaks.
func fieldError(field string, value any, rule string) *Error {
	if value == nil {
		return validation("1 validation error detected: Value at '%s' failed to satisfy constraint: %s", field, rule)
	}
	return validation("1 validation error detected: Value '%v' at '%s' failed to satisfy constraint: %s", value, field, rule)
}

func notFound(kind, id string) *Error {
	return &Error{Status: 404, Type: "ResourceNotFoundException", Message: fmt.Sprintf("%s %s not found", kind, id), ResourceType: kind, ResourceID: id}
}

func conflict(kind, id, format string, args ...any) *Error {
	return &Error{Status: 409, Type: "ConflictException", Message: fmt.Sprintf(format, args...), ResourceType: kind, ResourceID: id}
}

func accessDenied(msg string) *Error {
	return &Error{Status: 403, Type: "AccessDeniedException", Message: msg}
}

func internal(msg string) *Error {
	return &Error{Status: 500, Type: "InternalServerException", Message: msg, RetryAfter: 1}
}

// toAPIError maps an error category to the AWS error type, in this one
// place. kind and id name the resource for not-found and conflict errors.
func toAPIError(err error, kind, id string) *Error {
	var ae *Error
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, errdefs.ErrExhausted):
		return quotaError(err)
	case errors.Is(err, auth.ErrDenied):
		return accessDenied(err.Error())
	case errors.Is(err, errdefs.ErrNotFound):
		return notFound(kind, id)
	case errors.Is(err, errdefs.ErrConflict):
		return conflict(kind, id, "%s", err.Error())
	case errors.Is(err, errdefs.ErrInvalid):
		return validation("%s", err.Error())
	case errors.Is(err, errdefs.ErrUnavailable):
		return &Error{Status: 500, Type: "InternalServerException", Message: err.Error(), RetryAfter: 5}
	default:
		return internal(err.Error())
	}
}

func writeError(w http.ResponseWriter, r *http.Request, e *Error) {
	body := map[string]any{"message": e.Message}
	if e.ResourceID != "" {
		body["resourceId"] = e.ResourceID
	}
	if e.ResourceType != "" {
		body["resourceType"] = e.ResourceType
	}
	if e.ServiceCode != "" {
		body["serviceCode"] = e.ServiceCode
	}
	if e.QuotaCode != "" {
		body["quotaCode"] = e.QuotaCode
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("x-amzn-ErrorType", e.Type)
	if e.RetryAfter > 0 {
		h.Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	if e.Status >= 500 && r.Context().Err() == nil {
		slog.Error("api request failed", "method", r.Method, "path", r.URL.Path, "type", e.Type, "err", e.Message)
	}
	w.WriteHeader(e.Status)
	json.NewEncoder(w).Encode(body)
}
