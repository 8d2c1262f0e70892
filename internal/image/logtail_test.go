package image

import (
	"fmt"
	"strings"
	"testing"
)

func TestLogTail(t *testing.T) {
	tests := []struct {
		name   string
		writes []string
		keep   int
		want   string
	}{
		{name: "fewer lines than kept", writes: []string{"a\nb\n"}, keep: 3, want: "a\nb"},
		{name: "keeps the last lines", writes: []string{"1\n2\n3\n", "4\n5\n"}, keep: 2, want: "4\n5"},
		{name: "line split across writes", writes: []string{"hel", "lo\nwor", "ld"}, keep: 5, want: "hello\nworld"},
		{name: "crlf trimmed", writes: []string{"x\r\n"}, keep: 1, want: "x"},
		{name: "very long line bounded", writes: []string{strings.Repeat("z", 10000) + "\n"}, keep: 1, want: strings.Repeat("z", maxLine)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lt := NewLogTail(tt.keep)
			for _, w := range tt.writes {
				fmt.Fprint(lt, w)
			}
			if got := lt.String(); got != tt.want {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}
