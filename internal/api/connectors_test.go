package api_test

import (
	"testing"

	"github.com/kiln-sandbox/kiln/internal/api"
)

const internetEgress = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"

// TestEgressConnectorsOffered: an egress connector kiln cannot honour (a
// customer VPC connector, an ingress connector, another account's managed
// name) is a ValidationException naming what is available, on
// CreateMicrovmImage and on RunMicrovm. Before, such ARNs passed and the
// VM silently ran with no egress at all.
func TestEgressConnectorsOffered(t *testing.T) {
	e := newEnv(t)
	e.readyImage("app")
	bad := []struct{ name, arn string }{
		{"customer vpc", "arn:aws:lambda:us-east-1:111111111111:network-connector:my-vpc"},
		{"customer named like managed", "arn:aws:lambda:us-east-1:111111111111:network-connector:aws-network-connector:INTERNET_EGRESS"},
		{"ingress connector", "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS"},
		{"unknown managed", "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:VPC_EGRESS"},
	}
	for _, tt := range bad {
		t.Run("image/"+tt.name, func(t *testing.T) {
			body := imageBody("img-" + randName(t))
			body["egressNetworkConnectors"] = []any{internetEgress, tt.arn}
			_, err := do(t, e.c, "POST", base+"/microvm-images", nil, body)
			fails(t, err, "ValidationException", "egressNetworkConnectors.2")
			fails(t, err, "ValidationException", "aws-network-connector:INTERNET_EGRESS")
		})
		t.Run("run/"+tt.name, func(t *testing.T) {
			_, err := do(t, e.c, "POST", base+"/microvms", nil, map[string]any{
				"imageIdentifier": "app", "egressNetworkConnectors": []any{tt.arn}})
			fails(t, err, "ValidationException", "egressNetworkConnectors.1")
			fails(t, err, "ValidationException", "customer VPC egress connectors are not available")
		})
	}
	// INTERNET_EGRESS, in any region's spelling, is accepted.
	e.runningVM(map[string]any{"imageIdentifier": "app", "egressNetworkConnectors": []any{internetEgress}})
	e.runningVM(map[string]any{"imageIdentifier": "app", "egressNetworkConnectors": []any{"arn:aws:lambda:eu-west-1:aws:network-connector:aws-network-connector:INTERNET_EGRESS"}})
}

// TestDefaultEgress: a microVM that names no egress (nor does its image)
// gets none by default, and INTERNET_EGRESS when the operator chose AWS's
// default (--default-egress internet); what the run or image names wins.
func TestDefaultEgress(t *testing.T) {
	for _, tt := range []struct {
		name        string
		internet    bool
		imageEgress []any
		want        []any
	}{
		{"kiln default: none", false, nil, nil},
		{"aws default: internet", true, nil, []any{internetEgress}},
		{"image names it", false, []any{internetEgress}, []any{internetEgress}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, func(c *api.Config) { c.DefaultInternetEgress = tt.internet })
			body := imageBody("app")
			if tt.imageEgress != nil {
				body["egressNetworkConnectors"] = tt.imageEgress
			}
			e.ok("POST", base+"/microvm-images", nil, body)
			e.waitField(base+"/microvm-images/app", "state", "CREATED")
			id := e.runningVM(map[string]any{"imageIdentifier": "app"})
			got, _ := e.ok("GET", base+"/microvms/"+id, nil, nil)["egressNetworkConnectors"].([]any)
			if len(got) != len(tt.want) || (len(got) == 1 && got[0] != tt.want[0]) {
				t.Errorf("egressNetworkConnectors = %v, want %v", got, tt.want)
			}
		})
	}
}

func randName(t *testing.T) string {
	n := []byte(t.Name())
	for i, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			n[i] = '-'
		}
	}
	if len(n) > 60 {
		n = n[len(n)-60:]
	}
	return string(n)
}
