//! The arithmetic behind the number detectors: the GB 11643-1999 check
//! character, province codes, calendar dates and the Luhn check. Pure
//! functions over ASCII digits; `medbox-agents`' identifier tools use them too.

const CHECK_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const CHECK_CHARACTERS: &[u8; 11] = b"10X98765432";

/// The check character for the first 17 digits (GB 11643-1999, ISO 7064 MOD 11-2);
/// `None` unless `first_17` is exactly 17 ASCII digits.
pub fn resident_id_check_character(first_17: &str) -> Option<char> {
    if first_17.len() != 17 || !first_17.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sum: u32 = first_17
        .bytes()
        .zip(CHECK_WEIGHTS)
        .map(|(digit, weight)| u32::from(digit - b'0') * weight)
        .sum();
    Some(char::from(CHECK_CHARACTERS[(sum % 11) as usize]))
}

/// The province-level region for the first two digits of a resident ID (GB/T 2260).
pub fn province(code: &str) -> Option<&'static str> {
    Some(match code {
        "11" => "北京",
        "12" => "天津",
        "13" => "河北",
        "14" => "山西",
        "15" => "内蒙古",
        "21" => "辽宁",
        "22" => "吉林",
        "23" => "黑龙江",
        "31" => "上海",
        "32" => "江苏",
        "33" => "浙江",
        "34" => "安徽",
        "35" => "福建",
        "36" => "江西",
        "37" => "山东",
        "41" => "河南",
        "42" => "湖北",
        "43" => "湖南",
        "44" => "广东",
        "45" => "广西",
        "46" => "海南",
        "50" => "重庆",
        "51" => "四川",
        "52" => "贵州",
        "53" => "云南",
        "54" => "西藏",
        "61" => "陕西",
        "62" => "甘肃",
        "63" => "青海",
        "64" => "宁夏",
        "65" => "新疆",
        "71" => "台湾",
        "81" => "香港",
        "82" => "澳门",
        "83" => "台湾（居住证）",
        _ => return None,
    })
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in `month` of `year`; `None` for a month outside 1–12.
pub fn days_in_month(year: i64, month: u32) -> Option<u32> {
    Some(match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => return None,
    })
}

/// A calendar date that exists in the Gregorian calendar, years 1900–2199
/// (the range a resident ID or a clinical record can hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CivilDate {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

impl CivilDate {
    pub fn new(year: i64, month: u32, day: u32) -> Option<CivilDate> {
        let last_day = days_in_month(year, month)?;
        if !(1900..=2199).contains(&year) || day == 0 || day > last_day {
            return None;
        }
        Some(CivilDate { year, month, day })
    }

    /// Parses `YYYYMMDD`.
    pub fn from_yyyymmdd(digits: &str) -> Option<CivilDate> {
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        CivilDate::new(
            digits[0..4].parse().ok()?,
            digits[4..6].parse().ok()?,
            digits[6..8].parse().ok()?,
        )
    }

    /// Days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
    pub fn to_days(self) -> i64 {
        let year = if self.month <= 2 {
            self.year - 1
        } else {
            self.year
        };
        let era = year.div_euclid(400);
        let year_of_era = year - era * 400;
        let month = i64::from(self.month);
        let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5
            + i64::from(self.day)
            - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        era * 146_097 + day_of_era - 719_468
    }

    /// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`),
    /// without the 1900–2199 restriction.
    pub fn from_days(days: i64) -> CivilDate {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let day_of_era = z - era * 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        CivilDate { year, month, day }
    }

    /// Parses `YYYY`, `YYYY-MM` or `YYYY-MM-DD` (an ISO 8601 / FHIR `date`,
    /// or the date part of a `dateTime`); missing parts are the first month
    /// or day.
    pub fn from_iso(text: &str) -> Option<CivilDate> {
        let date = text.get(..10.min(text.len()))?;
        let mut parts = date.split('-');
        let year = parts.next()?.parse().ok()?;
        let month = parts.next().map_or(Some(1), |m| m.parse().ok())?;
        let day = parts.next().map_or(Some(1), |d| d.parse().ok())?;
        CivilDate::new(year, month, day)
    }

    /// Whole years from `self` (a birth date) to `on`.
    pub fn years_until(self, on: CivilDate) -> i64 {
        let had_birthday = (on.month, on.day) >= (self.month, self.day);
        on.year - self.year - i64::from(!had_birthday)
    }

    /// The date `days` later (earlier when negative).
    pub fn shifted(self, days: i64) -> CivilDate {
        CivilDate::from_days(self.to_days() + days)
    }
}

/// True when an 18-character (17 digits and a digit or `X`) or 15-digit
/// number has the shape of a resident ID: a known province and a real birth
/// date. The check character is not looked at (see [`resident_id_valid`]).
pub fn resident_id_shaped(id: &str) -> bool {
    let bytes = id.as_bytes();
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    match id.len() {
        18 if digits(0..17) && (bytes[17].is_ascii_digit() || bytes[17] == b'X') => {
            province(&id[..2]).is_some() && CivilDate::from_yyyymmdd(&id[6..14]).is_some()
        }
        15 if digits(0..15) => {
            province(&id[..2]).is_some()
                && CivilDate::from_yyyymmdd(&format!("19{}", &id[6..12])).is_some()
        }
        _ => false,
    }
}

/// A resident ID whose shape is right and, for the 18-character form, whose
/// check character matches (uppercase `X`).
pub fn resident_id_valid(id: &str) -> bool {
    resident_id_shaped(id)
        && (id.len() == 15 || resident_id_check_character(&id[..17]) == id[17..].chars().next())
}

/// The Luhn (mod 10) check over ASCII digits; false for anything else.
pub fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(index, byte)| {
            let digit = u32::from(byte - b'0');
            if index % 2 == 1 {
                let doubled = digit * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                digit
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The digit that makes `body` followed by it pass Luhn.
pub fn luhn_check_digit(body: &str) -> Option<char> {
    (b'0'..=b'9')
        .map(char::from)
        .find(|digit| luhn_valid(&format!("{body}{digit}")))
}
