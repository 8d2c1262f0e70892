package api

import (
	"net/url"
	"sort"
	"strings"
	"testing"
)

// FuzzValidateOp feeds arbitrary bodies and query strings to the
// validation layer of every operation: it must answer (nil or a
// ValidationException), never panic.
func FuzzValidateOp(f *testing.F) {
	f.Add(`{"name":"a","resources":[{"minimumMemoryInMiB":512}],"environmentVariables":{"k":"v"}}`, "maxResults=5&tagKeys=a&tagKeys=b", "id")
	f.Add(`{"allowedPorts":[{"range":{"startPort":1,"endPort":"x"}},null,7],"idlePolicy":[]}`, "maxResults=abc", "")
	f.Add(`[1,2]`, "nextToken=%zz", "a b")
	f.Add(`{"hooks":{"microvmHooks":"x"},"logging":{"cloudWatch":{"logGroup":":"}}}`, "", "arn:aws:lambda:us-east-1:1:microvm:x")
	ops := make([]string, 0, len(rules))
	for op := range rules {
		ops = append(ops, op)
	}
	sort.Strings(ops)
	f.Fuzz(func(t *testing.T, body, query, label string) {
		q, _ := url.ParseQuery(query)
		for _, op := range ops {
			w := wireOf(op, "GET /x/{microvmIdentifier}/{imageIdentifier}")
			in, err := input(w, func(string) string { return label }, q, []byte(body))
			if err != nil {
				continue
			}
			if e := validateOp(op, in); e != nil && (e.Status != 400 || !strings.Contains(e.Message, "validation error")) {
				t.Fatalf("%s: %v", op, e)
			}
		}
	})
}
