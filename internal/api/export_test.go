package api

// RuleView is a validation rule as the tests see it.
type RuleView struct {
	Path           string
	Required       bool
	MinLen, MaxLen int
	Pattern        string
	Min, Max       *int64
	Enum           []string
}

// Rules returns the validation table, by operation.
func Rules() map[string][]RuleView {
	out := map[string][]RuleView{}
	for op, rs := range rules {
		for _, r := range rs {
			out[op] = append(out[op], RuleView{r.path, r.required, r.minLen, r.maxLen, r.pattern, r.min, r.max, r.enum})
		}
	}
	return out
}
