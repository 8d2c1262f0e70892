package noderpc

import (
	"testing"

	"google.golang.org/grpc/mem"
)

// FuzzCodec: a message from a peer never panics the decoder, and what
// decodes encodes again.
func FuzzCodec(f *testing.F) {
	f.Add([]byte(`{"microvm":{"microvmId":"mvm-1","epoch":3,"node":"n"}}`))
	f.Add([]byte(`{"version":{},"builds":[{"buildId":"b"}]}`))
	f.Add([]byte(`{"seen":{"mvm-1":"2026-11-30T00:00:00Z"}}`))
	f.Add([]byte(`{"microvm":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, v := range []any{&MicrovmRequest{}, &BuildRequest{}, &ActivityRequest{}, &LogRequest{}} {
			if (codec{}).Unmarshal(mem.BufferSlice{mem.SliceBuffer(b)}, v) == nil {
				if _, err := (codec{}).Marshal(v); err != nil {
					t.Fatalf("decoded but cannot encode: %v", err)
				}
			}
		}
	})
}
